"""Tokenizer benchmark: lmforge against Hugging Face ``tokenizers`` and ``tiktoken``, in one run.

What is measured
----------------
1. **Training** on ``builtin:python-src`` (the stdlib's ``.py`` files, ≈12 MB) at vocabulary sizes
   8192 and 32768: lmforge's ``Tokenizer.train(..., workers=2)`` against HF's ``BpeTrainer``
   (``RAYON_NUM_THREADS=2``) set up like-for-like (GPT-4 split regex, ``ByteLevel`` without its own
   regex, the 256-byte initial alphabet, no special tokens). Every measurement runs in a fresh
   subprocess, so peak memory is clean; the documents are loaded into a list of ``str`` first and
   only the training call is timed. Peak RSS is ``ru_maxrss`` of the process, and for lmforge also
   the largest of its pool workers (``RUSAGE_CHILDREN``: forked, so they start out sharing the
   parent's pages). Each measurement is repeated (3 times by default); the median is reported,
   with the ratio lmforge / HF time (target ≤ 1.0) and whether both learned identical merges.
2. **Encoding** throughput, in MB/s (10⁶ bytes of UTF-8 input per second), of the
   ``builtin:python-docs`` documents (≈2.3 MB) with the lmforge tokenizer trained at the largest
   vocabulary, against a ``tiktoken.Encoding`` built from the same ranks (a separate object, not
   lmforge's own fast path) and HF ``tokenizers`` loading the ``tokenizer.json`` that
   ``lmforge.tokenizer.hf.save_hf`` writes. Two modes, best of 5 each:

   * *single*: a Python loop over the documents on one thread: ``tok.encode(d)`` /
     ``enc.encode_ordinary(d)`` / ``hf.encode(d, add_special_tokens=False).ids``;
   * *batch*: the whole list at once with 2 workers: ``tok.encode_batch(docs, workers=2)`` (a
     process pool) / ``enc.encode_ordinary_batch(docs, num_threads=2)`` (threads) /
     ``hf.encode_batch(docs, add_special_tokens=False)`` (rayon, 2 threads).

   The ids of all runs are checked to be identical; ratios are lmforge / peer throughput
   (target ≥ 1.0 against tiktoken).

   lmforge is also run with the same vocabulary plus its six default special tokens (appended
   after the last id, never allowed, so the ids do not change). The benchmark's tokenizer has
   none (as HF's trainer is given none); real ones usually do. This row checks that they cost
   nothing: with no special token allowed, ``Tokenizer.encode`` calls tiktoken's
   ``encode_ordinary``, skipping ``encode``'s special-token scan, which costs about as much as
   the encoding itself.

Running
-------
``make bench`` (or ``python benchmarks/tokenizer_bench.py``) runs everything (a few minutes on
2 cores); ``--quick`` is a smoke test: vocabulary 8192 only, one repeat of everything. The tables
are printed as Markdown, ready for ``benchmarks/RESULTS.md``. The ``--_worker`` options are the
subprocess entry points and are not meant to be used by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THREADS = 2
# Read by HF's rayon pool when it starts; set before ``tokenizers`` is imported, and inherited by
# every worker subprocess.
os.environ["RAYON_NUM_THREADS"] = str(THREADS)

VOCAB_SIZES = (8192, 32768)
TRAIN_REPEATS = 3
ENCODE_REPEATS = 5
TRAINERS = ("ours", "hf")
ENCODERS = ("ours", "ours+sp", "tiktoken", "hf")
LABELS = {"ours": "lmforge", "ours+sp": "lmforge +6 specials", "hf": "HF tokenizers",
          "tiktoken": "tiktoken"}
ENCODE_MODES = ("single", "batch")

Merges = list[tuple[str, str]]  # in GPT-2's byte-level alphabet, as tokenizer.json writes them


# --- helpers ------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _maxrss_mib(who: int) -> float:
    """Peak RSS of this process (``RUSAGE_SELF``) or of its largest reaped child, in MiB."""
    kib = resource.getrusage(who).ru_maxrss
    return kib / (1 << 20) if sys.platform == "darwin" else kib / 1024  # macOS reports bytes


def _rss_now_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _texts(corpus: Callable[[], Any]) -> list[str]:
    return [doc.text for doc in corpus()]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with aligned columns (readable in a terminal as well)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _run_worker(args: Sequence[str]) -> dict[str, Any]:
    """Run this script as a fresh subprocess worker and return the JSON it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", *args, str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr}")
        return json.loads(out.read_text(encoding="utf-8"))


# --- training -----------------------------------------------------------------------------------


def _train_ours(docs: list[str], vocab_size: int) -> tuple[float, Merges, Any]:
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.bytelevel import bytes_to_str

    seconds, tok = _timed(lambda: Tokenizer.train(docs, vocab_size, special_tokens=(),
                                                  workers=THREADS, show_progress=False))
    return seconds, [(bytes_to_str(a), bytes_to_str(b)) for a, b in tok.merges], tok


def _train_hf(docs: list[str], vocab_size: int) -> tuple[float, Merges, Any]:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from lmforge.tokenizer import GPT4_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seconds, _ = _timed(lambda: tok.train_from_iterator(docs, trainer))
    # tokenizers >= 0.20 writes merges as [a, b] pairs, older versions as "a b" strings.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    return seconds, merges, tok


def _train_worker(kind: str, vocab_size: str, save: str, out: Path) -> None:
    """One timed training run in this (fresh) process; ``save`` is a path for ours, or "-"."""
    from lmforge.data.builtin import python_src

    docs = _texts(python_src)
    rss_before = _rss_now_mib()
    seconds, merges, tok = {"ours": _train_ours, "hf": _train_hf}[kind](docs, int(vocab_size))
    result = {
        "seconds": seconds,
        "rss_before_mib": rss_before,
        "peak_mib": _maxrss_mib(resource.RUSAGE_SELF),
        "child_peak_mib": _maxrss_mib(resource.RUSAGE_CHILDREN) if kind == "ours" else None,
        "merges": merges,
    }
    if save != "-":
        tok.save(save)
    out.write_text(json.dumps(result), encoding="utf-8")


@dataclass
class TrainResult:
    kind: str
    vocab_size: int
    runs: list[dict[str, Any]]

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r[key] is not None]
        return statistics.median(values) if values else None

    @property
    def merges(self) -> Merges:
        return [tuple(m) for m in self.runs[0]["merges"]]

    @property
    def deterministic(self) -> bool:
        return all(r["merges"] == self.runs[0]["merges"] for r in self.runs)


def _first_difference(a: Merges, b: Merges) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"merge #{i}: {x} vs {y}"
    return f"lengths {len(a)} vs {len(b)}"


def bench_training(vocab_sizes: Sequence[int], repeats: int, save_dir: Path
                   ) -> tuple[dict[tuple[str, int], TrainResult], Path]:
    """Train every (trainer, vocab) ``repeats`` times in fresh processes, trainers interleaved.

    Returns the results and the path of the lmforge tokenizer saved at the largest vocabulary.
    """
    results = {(k, v): TrainResult(k, v, []) for v in vocab_sizes for k in TRAINERS}
    saved = save_dir / f"lmforge-{max(vocab_sizes)}.json"
    for v in vocab_sizes:
        for rep in range(repeats):
            for kind in TRAINERS:
                save = str(saved) if kind == "ours" and v == max(vocab_sizes) and rep == 0 else "-"
                run = _run_worker(["train", kind, str(v), save])
                results[kind, v].runs.append(run)
                print(f"  train {LABELS[kind]:<14} vocab {v:>6}  run {rep + 1}/{repeats}: "
                      f"{run['seconds']:6.2f} s, peak {run['peak_mib']:.0f} MiB", file=sys.stderr)
    return results, saved


def training_tables(results: dict[tuple[str, int], TrainResult]) -> str:
    vocab_sizes = sorted({v for _, v in results})
    rows = []
    for v in vocab_sizes:
        for kind in TRAINERS:
            r = results[kind, v]
            rows.append([str(v), LABELS[kind], _fmt(r.median("seconds"), 2),
                         " / ".join(f"{x['seconds']:.2f}" for x in r.runs),
                         _fmt(r.median("rss_before_mib"), 0), _fmt(r.median("peak_mib"), 0),
                         _fmt(r.median("child_peak_mib"), 0), str(len(r.merges))])
    times = _table(["vocab", "trainer", "time (s, median)", "runs (s)", "RSS before (MiB)",
                    "peak RSS (MiB)", "max child peak (MiB)", "merges"], rows)
    rows = []
    for v in vocab_sizes:
        ours, hf = results["ours", v], results["hf", v]
        same = ours.merges == hf.merges
        verdict = "yes" if same else f"NO ({_first_difference(ours.merges, hf.merges)})"
        rows.append([str(v), _fmt(ours.median("seconds") / hf.median("seconds"), 2),
                     _fmt(ours.median("peak_mib") / hf.median("peak_mib"), 2), verdict,
                     "yes" if ours.deterministic and hf.deterministic else "NO"])
    ratios = _table(["vocab", "time lmforge / HF", "peak RSS lmforge / HF (parent)",
                     "merges identical", "same merges every run"], rows)
    return f"{times}\n\n{ratios}"


# --- encoding -----------------------------------------------------------------------------------


def _best_of(fn: Callable[[], list[list[int]]], repeats: int) -> tuple[float, list[list[int]]]:
    best, ids = _timed(fn)
    for _ in range(repeats - 1):
        best = min(best, _timed(fn)[0])
    return best, ids


def _with_default_specials(tok: Any) -> Any:
    """``tok``'s vocabulary and merges plus lmforge's default special tokens, after the last id."""
    from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

    tokens = {i: t for i, t in tok.vocab.items() if i not in tok.special_tokens.values()}
    specials = {s: tok.vocab_size + k for k, s in enumerate(DEFAULT_SPECIAL_TOKENS)}
    return Tokenizer(tokens, tok.merges, specials, tok.pattern)


def _encode_worker(tokenizer_path: str, repeats: str, out: Path) -> None:
    """Encode python-docs with lmforge, tiktoken and HF in every mode; write times and checks."""
    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.data.builtin import python_docs
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.hf import save_hf

    tok = Tokenizer.load(tokenizer_path)
    specials = set(tok.special_tokens.values())
    enc = tiktoken.Encoding("peer", pat_str=tok.pattern, special_tokens={},
                            mergeable_ranks={t: i for i, t in tok.vocab.items()
                                             if i not in specials})
    with tempfile.TemporaryDirectory() as tmp:
        hf = HFTokenizer.from_file(str(save_hf(tok, tmp) / "tokenizer.json"))
    tok_sp = _with_default_specials(tok)
    docs = _texts(python_docs)
    for t in (tok, tok_sp):
        t.encode("warm up")  # builds lmforge's tiktoken encoder (lazily, once)

    # lmforge first in each mode: forking (ours' pool) after HF has used its thread pool makes
    # HF disable parallelism in the child, with a warning.
    runs: dict[str, dict[str, Callable[[], list[list[int]]]]] = {
        "single": {
            "ours": lambda: [tok.encode(d) for d in docs],
            "ours+sp": lambda: [tok_sp.encode(d) for d in docs],
            "tiktoken": lambda: [enc.encode_ordinary(d) for d in docs],
            "hf": lambda: [hf.encode(d, add_special_tokens=False).ids for d in docs],
        },
        "batch": {
            "ours": lambda: tok.encode_batch(docs, workers=THREADS),
            "ours+sp": lambda: tok_sp.encode_batch(docs, workers=THREADS),
            "tiktoken": lambda: enc.encode_ordinary_batch(docs, num_threads=THREADS),
            "hf": lambda: [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)],
        },
    }
    reference: list[list[int]] | None = None
    seconds: dict[str, dict[str, float]] = {}
    identical: dict[str, dict[str, bool]] = {}
    for mode, fns in runs.items():
        seconds[mode], identical[mode] = {}, {}
        for name, fn in fns.items():
            seconds[mode][name], ids = _best_of(fn, int(repeats))
            reference = reference if reference is not None else ids
            identical[mode][name] = ids == reference
            print(f"  encode {mode:<6} {LABELS[name]:<14}: {seconds[mode][name]:6.3f} s",
                  file=sys.stderr)
    assert reference is not None
    result = {"vocab_size": tok.vocab_size, "docs": len(docs),
              "bytes": sum(len(d.encode("utf-8")) for d in docs),
              "tokens": sum(map(len, reference)), "seconds": seconds, "identical": identical}
    out.write_text(json.dumps(result), encoding="utf-8")


def encoding_tables(result: dict[str, Any]) -> str:
    mb = result["bytes"] / 1e6
    rows, ratio_rows = [], []
    for mode in ENCODE_MODES:
        secs = result["seconds"][mode]
        for name in ENCODERS:
            rows.append([mode, LABELS[name], _fmt(secs[name], 3), _fmt(mb / secs[name], 2),
                         "yes" if result["identical"][mode][name] else "NO"])
        ratio_rows.append([mode, _fmt(secs["tiktoken"] / secs["ours"], 2),
                           _fmt(secs["hf"] / secs["ours"], 2),
                           _fmt(secs["tiktoken"] / secs["ours+sp"], 2)])
    times = _table(["mode", "encoder", "time (s, best)", "MB/s", "ids = lmforge single"], rows)
    ratios = _table(["mode", "throughput lmforge / tiktoken", "throughput lmforge / HF",
                     "lmforge +6 specials / tiktoken"], ratio_rows)
    all_same = all(all(d.values()) for d in result["identical"].values())
    return (f"{result['docs']} documents, {mb:.2f} MB, {result['tokens']} tokens, vocabulary "
            f"{result['vocab_size']}; ids identical across all encoders and modes: "
            f"{'yes' if all_same else 'NO'}\n\n{times}\n\n{ratios}")


# --- main ---------------------------------------------------------------------------------------


def _versions() -> str:
    from importlib.metadata import version

    return (f"Python {sys.version.split()[0]}, tokenizers {version('tokenizers')}, "
            f"tiktoken {version('tiktoken')}, {os.cpu_count()} CPUs")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: vocabulary 8192 only, one repeat of everything")
    parser.add_argument("--_worker", nargs="+", dest="worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        worker = {"train": _train_worker, "encode": _encode_worker}[kind]
        worker(*rest[:-1], Path(rest[-1]))
        return

    vocab_sizes = VOCAB_SIZES[:1] if args.quick else VOCAB_SIZES
    train_repeats = 1 if args.quick else TRAIN_REPEATS
    encode_repeats = 1 if args.quick else ENCODE_REPEATS
    print(f"tokenizer benchmark: {_versions()}; {THREADS} workers / threads", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        trained, saved = bench_training(vocab_sizes, train_repeats, Path(tmp))
        encoded = _run_worker(["encode", str(saved), str(encode_repeats)])
    print(f"\n{_versions()}; {THREADS} workers / threads\n")
    print(f"### Training on builtin:python-src (median of {train_repeats} fresh processes)\n")
    print(training_tables(trained))
    print(f"\n### Encoding builtin:python-docs (best of {encode_repeats})\n")
    print(encoding_tables(encoded))


if __name__ == "__main__":
    main()
