"""``lmforge data prepare``: raw text → filtered, deduplicated token shards.

    read SPECs → normalize → quality filters → exact + MinHash keys → tokenize     (process pool)
              → exact dedup → near dedup (LSH) → train/val split → shards + manifest  (this process)

Documents travel in chunks through a process pool; each chunk's results (filter verdicts, dedup
keys, MinHash signatures, tokens) are cached in ``DIR/.work/``, so an interrupted run resumes
where it stopped (a failed run keeps ``.work/`` only when it holds finished chunks). Deduplication
is global (over this rank's documents), so it runs once every chunk is done. Shards are written
into ``.work/out/`` (a resumed run keeps those already intact) and moved into ``DIR`` only at the
end, with the manifest; so an output of an earlier prepare, which is replaced only with ``force``,
stays whole until the new one is complete. Scale-out: ``rank``/``world_size``
(defaults from torchrun's ``RANK``/``WORLD_SIZE`` or Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``)
give each machine every ``world_size``-th document; it writes ``DIR/rank_NNNNN/``, and
``lmforge data merge DIR`` combines the rank manifests. With ``boilerplate_lines``, a first pass
counts the documents each line occurs in, and workers remove the frequent lines after normalizing
(:mod:`lmforge.data.boilerplate`; the set is kept in ``.work/`` for a resumed run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.config import build, check_at_least, option, to_dict
from lmforge.data import boilerplate
from lmforge.data.builtin import hash_fraction, is_validation
from lmforge.data.dedup import DedupConfig, MinHasher, exact_key, near_duplicates
from lmforge.data.filter_result import DocumentFilter
from lmforge.data.filters import apply_filters, build_filters
from lmforge.data.manifest import load_manifest, totals
from lmforge.data.output import REJECTS, STAGE, claim, finished, publish
from lmforge.data.pii import TYPES as PII_TYPES
from lmforge.data.pii import mask_pii
from lmforge.data.shards import Shard, token_dtype, write_shard
from lmforge.data.sources import ReadOptions, documents, parse_spec
from lmforge.errors import ConfigError, InputError
from lmforge.files import atomic_path, atomic_write_text
from lmforge.progress import progress_bar
from lmforge.tokenizer import ENDOFTEXT, Tokenizer

log = logging.getLogger(__name__)


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


@dataclass
class DataConfig:
    """How ``lmforge data prepare`` turns inputs into shards."""

    input: list[str] = option([], "input SPECs: path, glob (text, JSONL, Parquet, WARC/WET, "
                                  "Wikipedia XML dumps), code:DIR[:EXT,...], builtin:NAME, "
                                  "hf:NAME[:CONFIG]:SPLIT; @WEIGHT mixes (e.g. "
                                  "builtin:python-docs@2)")
    tokenizer: str = option("", "tokenizer file (lmforge tokenizer train)")
    out: str = option("data", "output directory for shards and manifest.json")
    field: str = option("text", "JSONL field / Parquet column / dataset column holding the text")
    separator: str | None = option(None, "split text files into documents at this string")
    preset: str = option("web", "quality filter preset: web, prose or code")
    filters: dict = option({}, "per-filter overrides, {filter: {field: value}} (YAML)")
    languages: list[str] = option([], "keep only documents in these languages, ISO 639-1 codes "
                                      "(e.g. en fr); runs the language filter before the preset's, "
                                      "threshold in filters.language; empty: off")
    boilerplate_lines: int = option(0, "remove lines (of >= 10 characters, stripped) found in "
                                       "more than this many documents of the corpus, before "
                                       "filtering (a first pass counts them); 0: off")
    mask_pii: bool = option(False, "replace e-mail addresses, phone numbers and IP addresses by "
                                   "|||EMAIL_ADDRESS|||, |||PHONE_NUMBER|||, |||IP_ADDRESS||| "
                                   "before filtering")
    dedup: dict = option({}, "dedup overrides: exact, near, ngram, bands, rows, seed (YAML)")
    val_fraction: float = option(0.01, "share of documents for validation (by document hash)")
    shard_tokens: int = option(1 << 24, "tokens per shard (shards hold whole documents)")
    chunk_documents: int = option(512, "documents per unit of parallel work (and of resume)")
    workers: int = option(0, "worker processes (0: one per core)")
    utf8_errors: Literal["replace", "strict", "quarantine"] = option(
        "replace", "invalid UTF-8: replace bad bytes (counted), stop, or drop the document")
    strict: bool = option(False, "stop at a malformed JSONL line or missing field (else skip)")
    rejects: bool = option(False, "write dropped documents with their reason to rejects.jsonl")
    force: bool = option(False, "replace the output of an earlier, different prepare in `out` "
                                "(removed only once the new shards are written) and rebuild one "
                                "finished with this config")
    rank: int = option(_env_int("RANK", "SLURM_PROCID", default=0), "this machine's rank")
    world_size: int = option(_env_int("WORLD_SIZE", "SLURM_NTASKS", default=1),
                             "number of machines sharing the inputs")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("input: give at least one SPEC")
        if not self.tokenizer:
            raise ConfigError("tokenizer: give the tokenizer file to encode with")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected [0, 1), got {self.val_fraction}")
        check_at_least(self, 1, "shard_tokens", "chunk_documents", "world_size")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank: {self.rank} is outside world_size {self.world_size}")
        check_at_least(self, 0, "workers", "boilerplate_lines")
        self.build_filters()  # rejects an unknown preset, filter, field or language now
        _ = self.dedup_config  # rejects bad dedup settings now
        _ = self.read_options  # rejects an empty field or separator now

    def build_filters(self) -> list[DocumentFilter]:
        """The filter chain: the language filter when ``languages`` is set, then the preset's."""
        overrides = dict(self.filters)
        if not self.languages:
            if "language" in overrides:
                raise ConfigError("filters.language: the language filter is off; set languages "
                                  "(e.g. [en]) to turn it on")
            return build_filters(self.preset, overrides)
        given = overrides.get("language", {})
        if isinstance(given, dict):  # else build_filters names the bad value
            overrides["language"] = {**given, "keep": self.languages}
        return build_filters(self.preset, overrides, first=("language",))

    @property
    def dedup_config(self) -> DedupConfig:
        return build(DedupConfig, ("dedup", self.dedup))

    @property
    def read_options(self) -> ReadOptions:
        """How inputs are read (a fresh issue counter each time); quarantine reads like replace
        and drops the document later."""
        errors = "replace" if self.utf8_errors == "quarantine" else self.utf8_errors
        return ReadOptions(field=self.field, separator=self.separator, utf8_errors=errors,
                           strict=self.strict)

    @property
    def out_dir(self) -> Path:
        out = Path(self.out)
        return out / f"rank_{self.rank:05d}" if self.world_size > 1 else out


def normalize(text: str) -> str:
    """Unicode NFC (one spelling per character) and \\n line ends; the text is otherwise kept."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n"))


# --- the parallel part: one chunk of documents per task -----------------------------------------

_W: dict[str, Any] = {}  # per-worker state, set by _init_worker


def _init_worker(config: DataConfig, tok: Tokenizer, work: Path) -> None:
    dedup = config.dedup_config
    _W.update(filters=config.build_filters(), mask_pii=config.mask_pii, dedup=dedup,
              hasher=MinHasher(dedup), tok=tok, eot=tok.token_id(ENDOFTEXT), work=work,
              rejects=config.rejects, quarantine=config.utf8_errors == "quarantine",
              boilerplate=boilerplate.load(work) if config.boilerplate_lines else None)


def _count_chunk(job: tuple[int, list[str], list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The boilerplate counting pass: each line hash of a chunk and the documents holding it."""
    return boilerplate.chunk_counts(normalize(text) for text in job[1])


def _process_chunk(job: tuple[int, list[str], list[int]]) -> dict[str, Any]:
    """Filter, key, hash and tokenize one chunk; cached as ``.work/chunk_K.npz``."""
    k, texts, replaced = job
    cache = _W["work"] / f"chunk_{k:06d}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    reasons, languages, kept_texts, rejected = [], [], [], []
    pii: Counter = Counter()
    lines_removed = documents_touched = 0
    for text, bad in zip(texts, replaced, strict=True):
        text = normalize(text)
        language = None
        if _W["boilerplate"] is not None:
            text, removed = boilerplate.remove_lines(text, _W["boilerplate"])
            lines_removed += removed
            documents_touched += removed > 0
        if _W["mask_pii"]:
            text, found = mask_pii(text)
            pii.update(found)
        if not text.strip():
            reason = "empty:empty"
        elif bad and _W["quarantine"]:
            reason = "utf8:invalid_utf8"
        else:
            result = apply_filters(_W["filters"], text)
            reason, text = (None, result.text) if result.keep else (result.reason, text)
            language = result.language
        reasons.append(reason or "")
        languages.append(language or "")
        if reason is None:
            kept_texts.append(text)
        elif _W["rejects"]:
            rejected.append(text)
    tokens = _W["tok"].encode_batch(kept_texts, workers=1) if kept_texts else []
    out = {
        "reasons": np.array(reasons, dtype=str),
        "languages": np.array(languages, dtype=str),  # "" where no language filter ran
        "pii": np.array([pii[t] for t in PII_TYPES], dtype=np.int64),  # masked, per type
        "keys": np.frombuffer(b"".join(map(exact_key, kept_texts)), np.uint8).reshape(-1, 16),
        "signatures": _signatures(kept_texts),
        "lengths": np.array([len(t) + 1 for t in tokens], dtype=np.int64),
        "tokens": np.concatenate([np.append(t, _W["eot"]) for t in tokens]).astype(np.uint32)
        if tokens else np.zeros(0, np.uint32),
        "rejected": np.array(rejected, dtype=str),
        "boilerplate": np.array([lines_removed, documents_touched], dtype=np.int64),
    }
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    return out


def _signatures(texts: list[str]) -> np.ndarray:
    """(len(texts), bands·rows) MinHash signatures; width 0 when near dedup is off."""
    if not _W["dedup"].near:
        return np.zeros((len(texts), 0), np.uint32)
    return _W["hasher"].signatures(texts)


# --- the sequential part ------------------------------------------------------------------------


@dataclass
class _Doc:
    name: str
    source: int  # index into the inputs, for mixing weights


def _chunks(config: DataConfig, opts: ReadOptions, meta: list[_Doc], read: Counter
            ) -> Iterator[tuple[int, list[str], list[int]]]:
    """This rank's documents in order, as (chunk index, texts, replaced bytes); fills ``meta``
    and the reading statistics ``read``."""
    texts: list[str] = []
    replaced: list[int] = []
    k = i = 0
    for source, spec in enumerate(config.input):
        for doc in documents(parse_spec(spec)[0], opts):
            if i % config.world_size == config.rank:
                meta.append(_Doc(doc.name, source))
                texts.append(doc.text)
                replaced.append(doc.replaced_bytes)
                read["documents"] += 1
                read["replaced_bytes"] += doc.replaced_bytes
                read["documents_with_invalid_utf8"] += doc.replaced_bytes > 0
                if len(texts) == config.chunk_documents:
                    yield k, texts, replaced
                    k, texts, replaced = k + 1, [], []
            i += 1
    if texts:
        yield k, texts, replaced


def _fingerprint(config: DataConfig, tok: Tokenizer) -> str:
    # Options added later count only when set, so older outputs stay valid.
    relevant = {k: v for k, v in to_dict(config).items()
                if k not in ("workers", "progress", "force")
                and not (k in ("languages", "mask_pii", "boilerplate_lines") and not v)}
    relevant["tokenizer"] = tok.fingerprint
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _repeats(name: str, weight: float) -> int:
    """How many copies of a training document a source weight asks for (fractions by hash)."""
    whole = int(weight)
    return whole + (hash_fraction("weight:" + name) < weight - whole)


def prepare(config: DataConfig) -> dict[str, Any]:
    """Run the pipeline; returns the manifest (also written to ``out_dir/manifest.json``).

    An existing ``out_dir`` is resumed, returned as it is, or refused unless ``config.force``: see
    :mod:`lmforge.data.output`.
    """
    tok = Tokenizer.load(config.tokenizer)
    tok.token_id(ENDOFTEXT)  # documents are separated by it: fail now if it is missing
    out = config.out_dir
    fingerprint = _fingerprint(config, tok)
    if not config.force and (manifest := finished(out, fingerprint)):
        log.info("%s: already prepared with this config; --force rebuilds it", out)
        return manifest
    work = claim(out, fingerprint, config.force)
    try:
        manifest = _run(config, tok, work)
        manifest["fingerprint"] = fingerprint
        names = [s["path"] for s in manifest["shards"]]
        names += [REJECTS] if config.rejects else []
        publish(out, work, names, manifest)
    except BaseException:
        _keep_if_resumable(work)
        raise
    return load_manifest(out)


def _run(config: DataConfig, tok: Tokenizer, work: Path) -> dict[str, Any]:
    """Every chunk through the pool, then dedup and shards into ``work/out``; the manifest."""
    opts = config.read_options
    meta: list[_Doc] = []
    read: Counter = Counter()
    results: list[dict[str, Any]] = []
    workers = config.workers or mp.cpu_count()
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    if config.boilerplate_lines and boilerplate.load(work) is None:  # a resumed run has it
        counter = boilerplate.LineCounter()
        with (progress_bar(config.progress, desc="count lines", unit="chunk") as bar,
              mp.get_context(method).Pool(workers) as pool):
            for values, counts in pool.imap(_count_chunk, _chunks(config, config.read_options,
                                                                  [], Counter())):
                counter.add(values, counts)
                bar.update()
        boilerplate.save(work, counter.frequent(config.boilerplate_lines))
        log.info("boilerplate: %d distinct lines counted", counter.distinct)
    with (progress_bar(config.progress, desc="filter+tokenize", unit="doc") as bar,
          mp.get_context(method).Pool(workers, _init_worker, (config, tok, work)) as pool):
        for result in pool.imap(_process_chunk, _chunks(config, opts, meta, read)):
            results.append(result)
            bar.update(len(result["reasons"]))
    read.update(opts.issues)
    manifest = _deduplicate_and_write(config, tok, work / STAGE, meta, results)
    manifest["stats"]["input"] = dict(read)
    return manifest


def _keep_if_resumable(work: Path) -> None:
    """After a failure: keep ``work`` when it holds finished chunks, which a rerun of the same
    command resumes from; else remove it."""
    chunks = len(list(work.glob("chunk_*.npz")))
    if chunks or (work / boilerplate.FILE).exists():
        log.info("%s: kept %d finished chunk(s); rerun the same command to resume", work, chunks)
    else:
        shutil.rmtree(work, ignore_errors=True)  # must not hide the error being raised


def _deduplicate_and_write(config: DataConfig, tok: Tokenizer, out: Path, meta: list[_Doc],
                           results: list[dict[str, Any]]) -> dict[str, Any]:
    reasons = np.concatenate([r["reasons"] for r in results]) if results else np.zeros(0, str)
    kept = np.flatnonzero(reasons == "")  # document index of each filtered-in document
    filter_drops = Counter(r.split(":")[0] for r in reasons.tolist() if r)
    if config.rejects:
        rejected = np.flatnonzero(reasons != "")
        texts = [t for r in results for t in r["rejected"].tolist()]
        lines = [json.dumps({"name": meta[i].name, "reason": str(reasons[i]), "text": t})
                 for i, t in zip(rejected, texts, strict=True)]
        atomic_write_text(out / REJECTS, "".join(line + "\n" for line in lines))

    dedup = config.dedup_config
    drop = np.zeros(len(kept), dtype=bool)
    exact = near = 0
    if dedup.exact and len(kept):
        seen: set[bytes] = set()
        for j, key in enumerate(np.concatenate([r["keys"] for r in results])):
            digest = key.tobytes()
            drop[j] = digest in seen
            seen.add(digest)
        exact = int(drop.sum())
    if dedup.near and len(kept):
        signatures = np.concatenate([r["signatures"] for r in results])
        survivors = np.flatnonzero(~drop)
        near_dup = survivors[near_duplicates(signatures[survivors], dedup.bands, dedup.rows)]
        drop[near_dup] = True
        near = len(near_dup)

    tokens = np.concatenate([r["tokens"] for r in results]) if results else np.zeros(0, np.uint32)
    ends = np.cumsum(np.concatenate([r["lengths"] for r in results])) if results else []
    weights = [parse_spec(s)[1] for s in config.input]
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    survivors = np.flatnonzero(~drop)
    for j in survivors:
        doc = meta[kept[j]]
        doc_tokens = tokens[(ends[j - 1] if j else 0) : ends[j]]
        if is_validation(doc.name, config.val_fraction):
            splits["val"].append(doc_tokens)
        else:
            splits["train"] += [doc_tokens] * _repeats(doc.name, weights[doc.source])
    if config.val_fraction and not splits["val"]:
        log.warning("no validation split: none of the %d documents fell in --val-fraction %g; "
                    "raise --val-fraction to get one", len(survivors), config.val_fraction)

    dtype = token_dtype(tok.vocab_size)
    shards = [s for split, docs in splits.items()
              for s in _write_shards(out, split, docs, dtype, config)]
    stats: dict[str, Any] = {"filters": dict(filter_drops),
                             "dedup": {"exact": exact, "near": near}}
    if config.mask_pii:
        found = sum((r["pii"] for r in results), np.zeros(len(PII_TYPES), np.int64))
        stats["pii"] = dict(zip(PII_TYPES, map(int, found), strict=True))
    if config.languages:
        stats["languages"] = _language_counts(results, reasons)
    if config.boilerplate_lines:  # the set is in work/, out's parent
        removed, touched = sum((r["boilerplate"] for r in results), np.zeros(2, np.int64))
        stats["boilerplate"] = {"lines_removed": int(removed), "documents_touched": int(touched),
                                "distinct_lines": len(boilerplate.load(out.parent))}
    return {"shards": shards, **totals(shards), "dtype": dtype.name,
            "tokenizer": {"path": str(Path(config.tokenizer).resolve()),
                          "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
            "stats": stats,
            "config": to_dict(config)}


def _language_counts(results: list[dict[str, Any]], reasons: np.ndarray
                    ) -> dict[str, dict[str, int]]:
    """{language: {"kept": n, "dropped": m}} over documents the language filter saw, most
    frequent first; kept means through every filter (before deduplication)."""
    languages = (np.concatenate([r["languages"] for r in results]) if results
                 else np.zeros(0, str)).tolist()
    counts: dict[str, Counter] = {}
    for language, reason in zip(languages, reasons.tolist(), strict=True):
        if language:
            counts.setdefault(language, Counter())["dropped" if reason else "kept"] += 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1].total())
    return {language: {"kept": c["kept"], "dropped": c["dropped"]} for language, c in ranked}


def _write_shards(out: Path, split: str, docs: list[np.ndarray], dtype: np.dtype,
                  config: DataConfig) -> list[dict[str, Any]]:
    """Pack whole documents into shards of about ``shard_tokens``; keep intact existing ones."""
    groups: list[list[np.ndarray]] = [[]]
    size = 0
    for d in docs:
        if size >= config.shard_tokens:
            groups.append([])
            size = 0
        groups[-1].append(d)
        size += len(d)
    shards = []
    with progress_bar(config.progress, desc=f"write {split}", total=len(groups),
                      unit="shard") as bar:
        for i, group in enumerate(g for g in groups if g):
            path = out / f"{split}_{i:05d}.bin"
            n_tokens = sum(map(len, group))
            if not _intact(path, n_tokens, len(group)):
                write_shard(path, group, dtype)
            shards.append({"path": path.name, "split": split, "tokens": n_tokens,
                           "documents": len(group)})
            bar.update()
    return shards


def _intact(path: Path, n_tokens: int, n_docs: int) -> bool:
    """A shard from an earlier, interrupted run of the same config that needs no rewrite."""
    try:
        shard = Shard(path)
    except InputError:  # missing, truncated or foreign
        return False
    return shard.num_tokens == n_tokens and shard.num_documents == n_docs
