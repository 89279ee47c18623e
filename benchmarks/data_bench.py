"""Data pipeline benchmark: ``lmforge data prepare`` against datatrove, side by side in one run.

What is measured
----------------
Documents per second (input documents / wall seconds, end to end) of the whole pipeline: read
JSONL → quality filters → exact + MinHash near-duplicate removal → tokenization → token files,
on 2 cores, for both:

* **lmforge**: ``prepare(DataConfig(preset="web", workers=2, val_fraction=0.0))``: C4, Gopher
  quality, Gopher repetition and FineWeb filters at their published thresholds; exact dedup by
  normalized-text digest; MinHash LSH with word 5-grams, 14 bands × 8 rows; tokenization with the
  tokenizer below; shards.
* **datatrove** (``LocalPipelineExecutor``, 2 workers; the usual FineWeb layout, one executor per
  stage, run one after another, all timed):

  1. ``JsonlReader`` → ``C4QualityFilter`` → ``GopherQualityFilter`` → ``GopherRepetitionFilter``
     → ``FineWebQualityFilter`` (our order: C4 first, so the others judge its cleaned text) →
     ``JsonlWriter`` (uncompressed) → ``ExactDedupSignature``; 2 tasks.
  2. ``ExactFindDedups``; 1 task.
  3. ``JsonlReader`` (filtered) → ``ExactDedupFilter`` → ``MinhashDedupSignature``; 2 tasks.
  4. ``MinhashDedupBuckets``; 14 tasks (one per bucket).
  5. ``MinhashDedupCluster``; 1 task.
  6. ``JsonlReader`` (filtered) → ``ExactDedupFilter`` → ``MinhashDedupFilter`` →
     ``DocumentTokenizer`` (our tokenizer exported with ``save_hf``, ``eos_token=<|endoftext|>``,
     no shuffling, as lmforge does not shuffle); 2 tasks.

  Configuration, aligned with lmforge's defaults wherever datatrove has a knob: C4
  ``min_num_sentences=3, min_words_per_line=5`` (the C4 reference code's values, which lmforge
  uses; datatrove defaults to 5 and 3), no bad-words list on either side; FineWeb
  ``char_duplicates_ratio=0.1`` (FineWeb §3.6; datatrove defaults to 0.01) and
  ``stop_chars`` = lmforge's terminal punctuation; Gopher filters at their defaults (the same
  published thresholds); ``MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8,
  seed=1)`` with datatrove's default 64-bit xxhash (lmforge hashes to 31 bits); exact dedup on
  the whitespace-collapsed text (lmforge's key). The rules themselves differ in places (see
  ``DT_DIFFERENCES`` below); the keep rates and per-filter drops are printed for both.

  datatrove runs its English word tokenizer (spaCy) inside the Gopher, FineWeb and MinHash steps
  and its sentence splitter inside C4: ``pip install spacy "xxhash<4" orjson`` besides datatrove.
  HF ``tokenizers`` is held to one thread per task (``RAYON_NUM_THREADS=1``), so both sides use
  2 cores.

The corpus (≈100 MB of JSONL in 4 files, built once and cached under the temp directory) comes
from the built-in sources, nothing is downloaded: ``builtin:python-src`` files cut into 2–8 KB
chunks at blank lines, and chunks assembled from random blocks of them (25% of the bytes; the web
preset drops nearly all code); the ``builtin:python-docs`` docstrings as they are; documents of
docstring paragraphs shuffled across docstrings (22%); web-like prose of docstring sentences
shuffled across documents, one line per paragraph or hard-wrapped (50%). Then near duplicates are
planted, 10% of the documents: copies of a random document with 2–5% of its words replaced, and
exact duplicates, 3%; the order is shuffled. Everything is seeded. The tokenizer (byte-level BPE,
8192) is trained on the built-in sources and cached with the corpus.

Each side runs ``--repeat`` times (default 2), alternating, lmforge first; the best wall time of
each is reported, with the 1-minute load average before each run (others' work on the machine
slows both: datatrove's 100 MB run takes about 2.5 minutes on an idle 2-core machine, twice that
on a busy one), and the CPU seconds of all processes involved, which others' work barely
moves. Then lmforge runs once more with deduplication off, which splits its time into
filter + tokenize + write and dedup (MinHash signatures + LSH), and its stages are timed one by
one (CPU seconds) in a single process on a sample of the corpus (``--profile-mb``) to show where
its time goes.

Running
-------
``make bench`` (or ``python benchmarks/data_bench.py``) runs the 100 MB corpus (about 5 minutes
on 2 idle cores, most of it datatrove; building the corpus the first time adds one);
``--quick`` is a smoke test on 10 MB with one run of each. ``--executor ray`` runs both sides on
one local Ray of 2 CPUs, started once before the runs (lmforge's ``--executor ray``, datatrove's
``RayPipelineExecutor`` per stage, one CPU per task), and lmforge once more on its local executor,
to state Ray's overhead and check that both executors write the same shards; CPU seconds are not
reported there (they are spent in Ray's worker processes). Tables
are printed as Markdown. datatrove's logs go to ``<work dir>/datatrove.log``; outputs are deleted
at the end, the corpus is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Read by HF tokenizers' rayon pool when it starts: one thread per datatrove task, 2 tasks.
os.environ["RAYON_NUM_THREADS"] = "1"

WORKERS = 2
FULL_MB, QUICK_MB = 100, 10
FILES = 4  # datatrove splits work by file: at least one per task
VOCAB_SIZE = 8192
NEAR_RATE, EXACT_RATE = 0.10, 0.03  # planted duplicates, per base document
EDIT_RATES = (0.02, 0.05)  # share of words replaced in a near duplicate, uniform in this range
# Shares of the base corpus bytes; the original docstrings come on top (≈2.3 MB).
SHARES = {"code": 0.25, "paragraphs": 0.22, "prose": 0.50}
NGRAM, BANDS, ROWS = 5, 14, 8
CORPUS_VERSION = 1  # bump when the corpus recipe changes: the cache key includes it
EOT = "<|endoftext|>"
FILTER_NAMES = ("c4", "gopher_quality", "gopher_repetition", "fineweb")

# Where datatrove's filters do not (and cannot be configured to) do what lmforge's do.
DT_DIFFERENCES = """\
- C4: datatrove drops a page for "{" only in lines it keeps, lmforge anywhere in the page (as
  §2.2 says); datatrove also drops lines ending in "..." and lines with a word over 1000
  characters, counts sentences with spaCy's sentencizer (lmforge: a regex) and does not treat
  ” and ’ as terminal punctuation.
- Gopher quality: datatrove's words are spaCy tokens, punctuation split off. Its word count
  and mean length skip symbol-only tokens, but its "80% of words contain a letter" rule counts
  them: "Return f(x, y)." is 6 words of which 3 have a letter (lmforge, whitespace words as in
  the paper: 3 of 3). This rule alone is why datatrove keeps far fewer documents of this
  technical prose. Its stop-word rule wants 2 *distinct* lowercase stop words (lmforge: 2
  occurrences, any case) and its bullets are only "•" and "-".
- Gopher repetition: datatrove divides duplicate characters by the length of the whole text
  (lmforge: by the characters of the lines / paragraphs / words), and splits paragraphs at
  "\\n\\n" and lines at "\\n+".
- FineWeb: a short line is <= 30 characters in datatrove, < 30 in lmforge; the duplicate-line
  ratio is over the text without newlines (lmforge: over the stripped lines).
- MinHash: datatrove hashes spaCy tokens of its simplified text (numbers normalized, diacritics
  removed) with 64-bit xxhash; lmforge hashes runs of letters and digits with a 31-bit hash."""


# --- helpers ------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with aligned columns (readable in a terminal as well)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (so also child processes' stderr) to ``path`` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children, including those that
    datatrove's fork server started (it reaps them; it outlives the runs, so it is read from
    /proc). Unlike wall time, this barely moves when others load the machine."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    server = sys.modules.get("multiprocess.forkserver")
    pid = server._forkserver._forkserver_pid if server else None
    if pid:
        with contextlib.suppress(OSError):
            # Fields after the command name: utime, stime, cutime, cstime are the 12th to 15th.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(map(int, fields[11:15])) / os.sysconf("SC_CLK_TCK")
    return total


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --- the corpus ---------------------------------------------------------------------------------

_BLANK_LINES = re.compile(r"\n\s*\n")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"^[A-Za-z]+$")
_WHITESPACE = re.compile(r"(\s+)")


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in _BLANK_LINES.split(text) if p.strip()]


def _sentences(docstrings: Sequence[str]) -> list[str]:
    """Prose sentences of the docstrings (no doctest or indented listings), deduplicated."""
    found = set()
    for doc in docstrings:
        for par in _paragraphs(doc):
            if par.lstrip().startswith((">>>", "...")) or "\n " in par:
                continue
            for s in _SENTENCE_BREAK.split(" ".join(par.split())):
                if len(s.split()) >= 4 and s[0].isupper() and s.endswith((".", "!", "?")):
                    found.add(s)
    return sorted(found)


def _wrap(text: str, width: int) -> str:
    """Hard-wrap one paragraph at ``width`` columns, as docstrings and e-mails are."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def _code_chunks(text: str, rng: random.Random) -> list[str]:
    """A source file cut at blank lines into chunks of 2–8 KB (the last may be shorter)."""
    chunks, blocks, size, target = [], [], 0, rng.randint(2000, 8000)
    for block in _paragraphs(text):
        blocks.append(block)
        size += len(block) + 2
        if size >= target:
            chunks.append("\n\n".join(blocks))
            blocks, size, target = [], 0, rng.randint(2000, 8000)
    if blocks:
        chunks.append("\n\n".join(blocks))
    return chunks


def _assemble(pool: Sequence[str], rng: random.Random, lo: int, hi: int, sep: str) -> str:
    """Random items of ``pool`` (distinct) joined by ``sep`` up to a size drawn in [lo, hi]."""
    target, parts, size = rng.randint(lo, hi), [], 0
    while size < target:
        parts.append(pool[rng.randrange(len(pool))])
        size += len(parts[-1]) + len(sep)
    return sep.join(dict.fromkeys(parts))


def _prose(sentences: Sequence[str], rng: random.Random) -> str:
    """Web-like prose: 3–10 paragraphs of 2–7 shuffled sentences, one line per paragraph or
    (40% of documents) hard-wrapped at 70–100 columns."""
    counts = [rng.randint(2, 7) for _ in range(rng.randint(3, 10))]
    chosen = rng.sample(sentences, sum(counts))
    width = rng.randint(70, 100) if rng.random() < 0.4 else 0
    pars, i = [], 0
    for n in counts:
        par = " ".join(chosen[i:i + n])
        pars.append(_wrap(par, width) if width else par)
        i += n
    return "\n\n".join(pars)


def _near_copy(text: str, rate: float, vocab: Sequence[str], rng: random.Random) -> str:
    """``text`` with ``rate`` of its whitespace-separated words (at least one) replaced."""
    parts = _WHITESPACE.split(text)  # words at even positions, whitespace at odd ones
    words = [i for i in range(0, len(parts), 2) if parts[i]]
    for i in rng.sample(words, max(1, round(rate * len(words)))):
        parts[i] = rng.choice(vocab)
    return "".join(parts)


@dataclass
class Corpus:
    files: list[Path]
    tokenizer: Path  # lmforge's tokenizer file
    hf_tokenizer: Path  # the same, as tokenizer.json for datatrove
    info: dict[str, Any]  # documents, bytes, and counts per kind

    @property
    def documents(self) -> int:
        return self.info["documents"]

    @property
    def mb(self) -> float:
        return self.info["bytes"] / 1e6


def _documents(target_bytes: int, seed: int) -> tuple[list[str], Counter]:
    """The corpus documents in order, and how many there are of each kind."""
    from lmforge.data.builtin import python_docs, python_src

    rng = random.Random(seed)
    docstrings = [d.text for d in python_docs()]
    sources = [d.text for d in python_src()]
    base_bytes = target_bytes / (1 + NEAR_RATE + EXACT_RATE)
    kinds: Counter = Counter()
    base: list[str] = []

    def take(kind: str, docs: Sequence[str]) -> None:
        base.extend(docs)
        kinds[kind] += len(docs)

    def fill(kind: str, budget: float, make: Callable[[], str]) -> None:
        docs, size = [], 0
        while size < budget:
            docs.append(make())
            size += len(docs[-1])
        take(kind, docs)

    # Code: the real chunks (a random subset when the corpus is small), then assembled ones.
    chunks = [c for text in sources for c in _code_chunks(text, rng)]
    rng.shuffle(chunks)
    code_budget, size, real = SHARES["code"] * base_bytes, 0, []
    for chunk in chunks:
        if size >= code_budget:
            break
        real.append(chunk)
        size += len(chunk)
    take("code", real)
    blocks = [b for text in sources for b in _paragraphs(text)]
    fill("code-assembled", code_budget - size, lambda: _assemble(blocks, rng, 2000, 8000, "\n\n"))
    # The docstrings as they are (a subset in a small corpus: at most 3% of it).
    share = min(1.0, 0.03 * base_bytes / sum(map(len, docstrings)))
    take("docstring", [d for d in docstrings if rng.random() < share])
    pars = [p for d in docstrings for p in _paragraphs(d)]
    fill("paragraphs", SHARES["paragraphs"] * base_bytes,
         lambda: _assemble(pars, rng, 800, 6000, "\n\n"))
    sentences = _sentences(docstrings)
    fill("prose", base_bytes - sum(map(len, base)), lambda: _prose(sentences, rng))

    vocab = sorted({w for s in sentences for w in s.split() if _WORD.match(w)})
    near = [_near_copy(rng.choice(base), rng.uniform(*EDIT_RATES), vocab, rng)
            for _ in range(round(NEAR_RATE * len(base)))]
    exact = [rng.choice(base) for _ in range(round(EXACT_RATE * len(base)))]
    kinds.update({"planted near duplicates": len(near), "planted exact duplicates": len(exact)})
    docs = base + near + exact
    rng.shuffle(docs)
    return docs, kinds


def build_corpus(mb: int, seed: int, root: Path, files: int = FILES) -> Corpus:
    """The benchmark corpus of about ``mb`` MB in ``files`` JSONL files and its tokenizer, built
    once and cached."""
    recipe = f"{CORPUS_VERSION}:{mb}:{seed}:{sys.version}" + (f":{files}" if files != FILES else "")
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    cache = root / f"corpus-{mb}mb-{key}"
    if not (cache / "info.json").exists():
        from lmforge.data.builtin import python_docs, python_src
        from lmforge.tokenizer import Tokenizer
        from lmforge.tokenizer.hf import save_hf

        print(f"building the {mb} MB corpus in {cache} (cached for later runs) ...", flush=True)
        tmp = _fresh(cache.with_name(cache.name + ".tmp"))
        docs, kinds = _documents(mb * 10**6, seed)
        (tmp / "data").mkdir()
        for i in range(files):
            part = docs[i * len(docs) // files:(i + 1) * len(docs) // files]
            with open(tmp / "data" / f"{i:02d}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in part)
        texts = [d.text for d in python_docs()] + [d.text for d in python_src()]
        tok = Tokenizer.train(texts, VOCAB_SIZE, workers=WORKERS, show_progress=False)
        tok.save(tmp / "tokenizer.json")
        save_hf(tok, tmp / "hf")
        info = {"documents": len(docs), "bytes": sum(len(t.encode("utf-8")) for t in docs),
                "kinds": dict(kinds), "seed": seed}
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return Corpus(sorted((cache / "data").glob("*.jsonl")), cache / "tokenizer.json",
                  cache / "hf" / "tokenizer.json", json.loads((cache / "info.json").read_text()))


def _same_output(a: Path, b: Path) -> bool:
    """Whether two prepared directories hold the same shard bytes and statistics."""
    from lmforge.data.manifest import load_manifest

    ma, mb = load_manifest(a), load_manifest(b)
    return (ma["stats"] == mb["stats"] and ma["shards"] == mb["shards"]
            and all((a / s["path"]).read_bytes() == (b / s["path"]).read_bytes()
                    for s in ma["shards"]))


def _check_same_vocabulary(corpus: Corpus) -> None:
    """Both sides must tokenize alike: compare ids on the first 200 documents."""
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.tokenizer import Tokenizer

    ours, hf = Tokenizer.load(corpus.tokenizer), HFTokenizer.from_file(str(corpus.hf_tokenizer))
    with open(corpus.files[0], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(200), f, strict=False)]
    for text in texts:
        if list(ours.encode(text)) != hf.encode(text, add_special_tokens=False).ids:
            raise RuntimeError("the exported tokenizer.json encodes differently from lmforge's "
                               f"tokenizer, e.g. {text[:80]!r}")


# --- the two pipelines --------------------------------------------------------------------------


@dataclass
class Result:
    wall: float
    cpu: float  # CPU seconds of all processes involved
    kept: int
    filter_drops: dict[str, int]
    exact: int
    near: int
    tokens: int
    load: float  # 1-minute load average before the run
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)  # (wall, CPU) s
    reasons: dict[str, Counter] = field(default_factory=dict)  # filter -> rule -> drops


def run_lmforge(corpus: Corpus, out: Path, dedup: bool = True, executor: str = "local"
                ) -> Result:
    from lmforge.data.pipeline import DataConfig, prepare

    _fresh(out)  # prepare returns a finished run's manifest without work: start clean
    load = os.getloadavg()[0]
    config = DataConfig(input=[str(p) for p in corpus.files], tokenizer=str(corpus.tokenizer),
                        out=str(out), preset="web", workers=WORKERS, progress=False,
                        val_fraction=0.0, executor=executor,
                        dedup={} if dedup else {"exact": False, "near": False})
    cpu, start = _cpu_seconds(), time.perf_counter()
    manifest = prepare(config)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    cpu = cpu if executor == "local" else float("nan")  # Ray's workers are not our children
    stats = manifest["stats"]
    if stats["input"]["documents"] != corpus.documents:
        raise RuntimeError(f"lmforge read {stats['input']['documents']} documents, "
                           f"expected {corpus.documents}")
    return Result(wall, cpu, manifest["num_documents"], dict(stats["filters"]),
                  stats["dedup"]["exact"], stats["dedup"]["near"], manifest["num_tokens"], load)


def _cpu_text(seconds: float) -> str:
    return "–" if seconds != seconds else f"{seconds:.1f}"  # NaN: spent in Ray's workers


def _total(entry: Any) -> int:
    """A datatrove stats entry's total: a MetricStats, or (read back from stats.json, as the Ray
    executor leaves them) a {"total": ...} mapping or a bare number; 0 when absent."""
    if entry is None:
        return 0
    if isinstance(entry, dict):
        return int(entry.get("total", 0))
    return int(getattr(entry, "total", entry))


def _collapsed_text(doc: Any) -> str:
    """datatrove's exact-dedup key, as lmforge's: the text with whitespace runs collapsed
    (the return annotation tells datatrove to hash a str)."""
    return " ".join(doc.text.split())


def run_datatrove(corpus: Corpus, work: Path, executor: str = "local") -> Result:
    """The datatrove pipeline, stage by stage; all stages are timed. With ``executor="ray"``
    each stage runs on datatrove's ``RayPipelineExecutor`` (Ray must be initialized)."""
    try:
        import orjson  # noqa: F401  (JsonlReader needs it)
        import spacy  # noqa: F401  (datatrove's English word tokenizer)
        import xxhash  # noqa: F401  (MinhashConfig's default hash)
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.dedup import (
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )
        from datatrove.pipeline.dedup.exact_dedup import (
            ExactDedupConfig,
            ExactDedupFilter,
            ExactDedupSignature,
            ExactFindDedups,
        )
        from datatrove.pipeline.dedup.minhash import MinhashConfig
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.tokens import DocumentTokenizer
        from datatrove.pipeline.writers import JsonlWriter
    except ImportError as e:
        raise SystemExit(f"datatrove side: {e}; install with "
                         "pip install 'datatrove>=0.10' spacy 'xxhash<4' orjson") from None
    from lmforge.data.filters import C4Config

    _fresh(work)
    d = {name: work / name for name in ("filtered", "exact_sigs", "exact_dups", "minhash_sigs",
                                        "minhash_buckets", "minhash_remove", "tokens", "logs")}
    exact_cfg = ExactDedupConfig(content_getter=_collapsed_text)
    mh_cfg = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=1)
    filters = [
        C4QualityFilter(min_num_sentences=3, min_words_per_line=5),
        GopherQualityFilter(),
        GopherRepetitionFilter(),
        FineWebQualityFilter(char_duplicates_ratio=0.1,
                             stop_chars=tuple(C4Config().terminal_punctuation)),
    ]

    def reader(folder: Path) -> Any:
        return JsonlReader(str(folder), glob_pattern="*.jsonl")

    stages: list[tuple[str, list[Any], int]] = [
        ("filter", [reader(corpus.files[0].parent), *filters,
                    JsonlWriter(str(d["filtered"]), output_filename="${rank}.jsonl",
                                compression=None),
                    ExactDedupSignature(str(d["exact_sigs"]), config=exact_cfg)], WORKERS),
        ("exact find", [ExactFindDedups(str(d["exact_sigs"]), str(d["exact_dups"]),
                                        config=exact_cfg)], 1),
        ("minhash signatures", [reader(d["filtered"]),
                                ExactDedupFilter(str(d["exact_dups"]), config=exact_cfg),
                                MinhashDedupSignature(str(d["minhash_sigs"]), config=mh_cfg)],
         WORKERS),
        ("minhash buckets", [MinhashDedupBuckets(str(d["minhash_sigs"]),
                                                 str(d["minhash_buckets"]), config=mh_cfg)],
         BANDS),
        ("minhash cluster", [MinhashDedupCluster(str(d["minhash_buckets"]),
                                                 str(d["minhash_remove"]), config=mh_cfg)], 1),
        ("dedup + tokenize", [reader(d["filtered"]),
                              ExactDedupFilter(str(d["exact_dups"]), config=exact_cfg),
                              MinhashDedupFilter(str(d["minhash_remove"])),
                              DocumentTokenizer(str(d["tokens"]),
                                                tokenizer_name_or_path=str(corpus.hf_tokenizer),
                                                eos_token=EOT, shuffle_documents=False)],
         WORKERS),
    ]
    times, cpu, stats = {}, {}, {}
    load = os.getloadavg()[0]
    with _stderr_to(work.parent / "datatrove.log"):
        for name, pipeline, tasks in stages:
            logs = str(d["logs"] / name.replace(" ", "_"))
            if executor == "ray":
                from datatrove.executor.ray import RayPipelineExecutor

                stage = RayPipelineExecutor(pipeline, tasks=tasks, workers=min(tasks, WORKERS),
                                            logging_dir=logs, cpus_per_task=1, mem_per_cpu_gb=1)
            else:
                stage = LocalPipelineExecutor(pipeline, tasks=tasks,
                                              workers=min(tasks, WORKERS), logging_dir=logs)
            cpu[name], start = _cpu_seconds(), time.perf_counter()
            stats[name] = stage.run()
            if stats[name] is None:  # RayPipelineExecutor leaves its totals in stats.json
                from datatrove.utils.stats import PipelineStats

                with open(Path(logs) / "stats.json", encoding="utf-8") as f:
                    stats[name] = PipelineStats.from_json(json.load(f))
            times[name] = time.perf_counter() - start
            cpu[name] = _cpu_seconds() - cpu[name] if executor == "local" else float("nan")

    def stat(name: str, step: int, key: str) -> int:
        return _total(stats[name].stats[step].stats.get(key))

    def reasons(step: int) -> Counter:
        found = stats["filter"].stats[step].stats
        return Counter({k.removeprefix("dropped_"): _total(v) for k, v in found.items()
                        if k.startswith("dropped_")})

    read = stat("filter", 0, "documents")
    if read != corpus.documents:
        raise RuntimeError(f"datatrove read {read} documents, expected {corpus.documents}")
    drops = {n: stat("filter", 1 + i, "dropped") for i, n in enumerate(FILTER_NAMES)}
    exact, near = stat("dedup + tokenize", 1, "dropped"), stat("dedup + tokenize", 2, "dropped")
    kept = stat("dedup + tokenize", 2, "forwarded")
    tokens = stat("dedup + tokenize", 3, "tokens")
    return Result(sum(times.values()), sum(cpu.values()), kept, drops, exact, near, tokens, load,
                  {n: (times[n], cpu[n]) for n in times},
                  {n: reasons(1 + i) for i, n in enumerate(FILTER_NAMES)})


# --- where lmforge's time goes ------------------------------------------------------------------


def profile_lmforge(corpus: Corpus, sample_mb: float) -> tuple[list[list[str]], int, float]:
    """Each lmforge stage timed on its own (CPU seconds, so that others' work on the machine
    does not count), in this one process, on every k-th document (about ``sample_mb`` MB):
    (table rows, documents, MB)."""
    import numpy as np

    from lmforge.data.dedup import DedupConfig, MinHasher, exact_key, near_duplicates
    from lmforge.data.filters import build_filters
    from lmforge.data.pipeline import normalize
    from lmforge.tokenizer import Tokenizer

    step = max(1, round(corpus.mb / sample_mb))
    times: Counter = Counter()

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.process_time()
        result = fn()
        times[name] += time.process_time() - start
        return result

    lines = [line for path in corpus.files
             for line in path.read_text(encoding="utf-8").splitlines()][::step]
    texts = timed("parse JSON lines", lambda: [json.loads(line)["text"] for line in lines])
    texts = timed("normalize (NFC)", lambda: [normalize(t) for t in texts])
    kept = []
    filters = build_filters("web")
    clock = time.process_time
    for text in texts:  # apply_filters, with a clock around each filter
        for f in filters:
            start = clock()
            result = f(text)
            times[f"filter: {f.name}"] += clock() - start
            if not result.keep:
                break
            text = result.text
        else:
            kept.append(text)
    timed("exact keys (BLAKE2b)", lambda: [exact_key(t) for t in kept])
    config = DedupConfig()
    signatures = timed("MinHash signatures", lambda: MinHasher(config).signatures(kept))
    tok = Tokenizer.load(corpus.tokenizer)
    tokens = timed("tokenize (encode_batch, 1 worker)",
                   lambda: tok.encode_batch(kept, workers=1))
    timed("tokens to uint32 arrays + EOT",
          lambda: [np.append(t, 0).astype(np.uint32) for t in tokens])
    timed("LSH near dedup", lambda: near_duplicates(signatures, config.bands, config.rows))
    total = sum(times.values())
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    rows = [[name, f"{s:.2f}", f"{100 * s / total:.0f}%", f"{1e6 * s / len(texts):.0f}"]
            for name, s in times.items()]
    rows.append(["total", f"{total:.2f}", "100%", f"{1e6 * total / len(texts):.0f}"])
    return rows, len(texts), mb


# --- main ---------------------------------------------------------------------------------------


def _row(name: str, corpus: Corpus, r: Result) -> list[str]:
    drops = sum(r.filter_drops.values())
    kept = f"{r.kept:,} ({100 * r.kept / corpus.documents:.1f}%)"
    return [name, f"{corpus.documents:,}", f"{corpus.mb:.1f}", f"{r.wall:.1f}",
            f"{corpus.documents / r.wall:,.0f}", _cpu_text(r.cpu), kept, f"{drops:,}",
            f"{r.exact:,} / {r.near:,}", f"{r.tokens:,}"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_MB} MB corpus, one repeat")
    parser.add_argument("--mb", type=int, default=None, help=f"corpus size (default {FULL_MB})")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of each side, best reported (default 2; --quick: 1)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--profile-mb", type=float, default=10.0,
                        help="corpus sample for the one-process stage timings (0: skip)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="both sides on their local process pools, or both on Ray (one "
                             "local Ray of 2 CPUs, started once; lmforge then also runs once "
                             "locally, to state Ray's overhead and check the output is the same)")
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "lmforge-data-bench",
                        help="cache and scratch directory")
    args = parser.parse_args(argv)
    mb = args.mb or (QUICK_MB if args.quick else FULL_MB)
    repeat = args.repeat or (1 if args.quick else 2)
    run = {"lmforge": lambda: run_lmforge(corpus, args.work / "out-lmforge",
                                          executor=args.executor),
           "datatrove": lambda: run_datatrove(corpus, args.work / "out-datatrove",
                                              executor=args.executor)}

    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "datatrove.log").unlink(missing_ok=True)
    corpus = build_corpus(mb, args.seed, args.work)
    _check_same_vocabulary(corpus)
    print(f"corpus: {corpus.documents:,} documents, {corpus.mb:.1f} MB in {len(corpus.files)} "
          f"files; {', '.join(f'{k}: {v:,}' for k, v in corpus.info['kinds'].items())}")

    if args.executor == "ray":
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=WORKERS, include_dashboard=False)
        print(f"Ray started in {time.perf_counter() - start:.1f} s, {WORKERS} CPUs "
              "(not counted in either side's time)", flush=True)
    runs: dict[str, list[Result]] = {"lmforge": [], "datatrove": []}
    for i in range(repeat):
        for name in runs:
            runs[name].append(run[name]())
            print(f"{name} run {i + 1}/{repeat}: {runs[name][-1].wall:.1f} s "
                  f"(load before: {runs[name][-1].load:.1f})", flush=True)
    best = {name: min(rs, key=lambda r: r.wall) for name, rs in runs.items()}
    ours, theirs = best["lmforge"], best["datatrove"]
    local = ours
    if args.executor == "ray":
        local = run_lmforge(corpus, args.work / "out-lmforge-local")
        same = _same_output(args.work / "out-lmforge-local", args.work / "out-lmforge")
        print(f"\n### lmforge on Ray vs its local executor, {WORKERS} workers\n")
        print(_table(["executor", "wall s", "docs/s", "CPU s (driver + pool)"],
                     [["local", f"{local.wall:.1f}", f"{corpus.documents / local.wall:,.0f}",
                       f"{local.cpu:.1f}"],
                      ["ray", f"{ours.wall:.1f}", f"{corpus.documents / ours.wall:,.0f}",
                       "(in Ray's workers)"]]))
        overhead = ours.wall - local.wall
        print(f"\nRay / local wall time: {ours.wall / local.wall:.2f}× ({overhead:+.1f} s of Ray "
              f"overhead); shards and manifest stats identical: {same}")
    no_dedup = run_lmforge(corpus, args.work / "out-lmforge", dedup=False)

    print(f"\n### Data pipeline, {corpus.mb:.0f} MB corpus, {WORKERS} workers, {args.executor} "
          f"executors (best of {repeat})\n")
    headers = ["pipeline", "docs", "MB", "wall s", "docs/s", "CPU s", "kept docs", "filter drops",
               "dedup removed (exact / near)", "tokens written"]
    print(_table(headers, [_row("lmforge", corpus, ours), _row("datatrove", corpus, theirs)]))
    cpu = ("" if args.executor == "ray" else  # Ray's workers are not this process's children
           f"CPU seconds: {theirs.cpu / ours.cpu:.2f}× fewer. ")
    print(f"\nlmforge / datatrove docs/s: **{theirs.wall / ours.wall:.2f}×** (target ≥ 1.0×); "
          f"{cpu}All runs, wall s (load average "
          "before): " + "; ".join(f"{n} " + ", ".join(f"{r.wall:.1f} ({r.load:.1f})" for r in rs)
                                  for n, rs in runs.items()))

    print("\n### Documents dropped per filter (in pipeline order)\n")
    print(_table(["filter", "lmforge", "datatrove", "datatrove's reasons"],
                 [[n, f"{ours.filter_drops.get(n, 0):,}", f"{theirs.filter_drops.get(n, 0):,}",
                   ", ".join(f"{k} {v:,}" for k, v in theirs.reasons[n].most_common(3))]
                  for n in FILTER_NAMES]))
    print("\nRules datatrove implements differently:\n" + DT_DIFFERENCES)

    print("\n### Where the time goes (lmforge: local executor)\n")
    rows = [["lmforge", "filter + tokenize + write (dedup off)", f"{no_dedup.wall:.1f}",
             f"{no_dedup.cpu:.1f}"],
            ["lmforge", "MinHash signatures + exact/LSH dedup (difference)",
             f"{local.wall - no_dedup.wall:.1f}", f"{local.cpu - no_dedup.cpu:.1f}"]]
    rows += [["datatrove", name, f"{wall:.1f}", _cpu_text(cpu)]
             for name, (wall, cpu) in theirs.stages.items()]
    print(_table(["pipeline", "stage", "wall s", "CPU s"], rows))
    if args.profile_mb > 0:
        rows, n, sample_mb = profile_lmforge(corpus, args.profile_mb)
        print(f"\nlmforge stages one at a time, one process, on {n:,} documents "
              f"({sample_mb:.1f} MB, every k-th):\n")
        print(_table(["stage", "CPU s", "share", "µs / doc"], rows))
    for out in ("out-lmforge", "out-lmforge-local", "out-datatrove"):  # the corpus stays cached
        shutil.rmtree(args.work / out, ignore_errors=True)


if __name__ == "__main__":
    main()
