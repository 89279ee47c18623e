"""The first stage of ``lmforge data prepare``: read a partition, then filter, key and tokenize
it, one file per chunk of documents.

A *partition* is one input file (of a path, directory or glob SPEC) or one ``builtin:``,
``hf:`` or ``code:`` SPEC: :func:`list_partitions`. Its documents, in reading order (on a rank of
a ``--world-size`` run, those whose name hashes to the rank), are cut into chunks of
``chunk_documents``; chunk ``k`` of partition ``p`` becomes ``.work/chunks/PPPPP_KKKKKK.npz``,
written whole or not at all, so it is both the unit of resume and the bound on memory. A task
``(p, j, of)`` reads partition ``p`` and does the chunks ``k ≡ j (mod of)`` not yet on disk, so a
partition can be shared by ``of`` tasks when there are fewer partitions than workers (each reads
it all, and works on its share); which task did a chunk never changes its file. The task with
``j = 0`` records the partition's reading statistics and its number of chunks in
``.work/read/PPPPP.json``; a task whose chunks are all on disk returns without reading.

Two stages run this way: ``count`` (with ``boilerplate_lines``: the documents holding each line,
:mod:`lmforge.data.boilerplate`) and ``process`` (normalize, boilerplate lines out, PII masked,
filters, exact key, MinHash band keys, train/validation split, tokens).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lmforge.config import to_dict
from lmforge.data import boilerplate
from lmforge.data.builtin import Document, hash_fraction, is_validation
from lmforge.data.dedup import MinHasher, band_keys, exact_key
from lmforge.data.filters import apply_filters
from lmforge.data.pii import TYPES as PII_TYPES
from lmforge.data.pii import mask_pii
from lmforge.data.prepare_config import DataConfig, normalize
from lmforge.data.reading import ReadOptions
from lmforge.data.shards import token_dtype
from lmforge.data.sources import parse_spec, partitions, read_documents
from lmforge.data.storage import Store
from lmforge.tokenizer import ENDOFTEXT, Tokenizer

Stage = Literal["count", "process"]


@dataclass(frozen=True)
class Partition:
    index: int  # position in the run: documents are ordered by (partition, position in it)
    source: int  # index of its SPEC in ``config.input`` (for the mixing weight)
    spec: str  # a file, or a whole builtin:/hf:/code: SPEC


def list_partitions(config: DataConfig) -> list[Partition]:
    """Every partition of the inputs, in reading order; raises for a missing path or empty glob."""
    specs = [(source, part) for source, spec in enumerate(config.input)
             for part in partitions(parse_spec(spec)[0])]
    return [Partition(i, source, spec) for i, (source, spec) in enumerate(specs)]


def _chunk_folder(stage: Stage) -> str:
    return "chunks" if stage == "process" else "lines"


def chunk_file(work: Store, stage: Stage, partition: int, k: int) -> Store:
    return work / _chunk_folder(stage) / f"{partition:05d}_{k:06d}.npz"


def count_chunks(work: Store, stage: Stage) -> int:
    """Chunk files of ``stage`` written so far (its progress)."""
    return sum(name.endswith(".npz") for name in (work / _chunk_folder(stage)).names())


def read_file(work: Store, partition: int) -> Store:
    return work / "read" / f"{partition:05d}.json"


def read_stats(work: Store, partition: int) -> dict[str, Any]:
    """What reading partition ``partition`` counted (``chunks``, ``seen``: documents before the
    rank's share, ``documents``, ``replaced_bytes``, … and the readers' issue counts)."""
    return json.loads(read_file(work, partition).read_text())


def _on_rank(name: str, config: DataConfig) -> bool:
    """Whether this rank of a ``--world-size`` run takes the document (by a hash of its name that
    is independent of the validation split's)."""
    return int(hash_fraction("rank:" + name) * config.world_size) == config.rank


def _chunks(config: DataConfig, spec: str, opts: ReadOptions, read: Counter
            ) -> Iterator[tuple[int, list[Document]]]:
    """(k, documents) for each chunk of the partition ``spec`` on this rank; fills ``read``."""
    docs: list[Document] = []
    k = 0
    for doc in read_documents(spec, opts):
        read["seen"] += 1
        if config.world_size > 1 and not _on_rank(doc.name, config):
            continue
        docs.append(doc)
        read["documents"] += 1
        read["replaced_bytes"] += doc.replaced_bytes
        read["documents_with_invalid_utf8"] += doc.replaced_bytes > 0
        if len(docs) == config.chunk_documents:
            yield k, docs
            k, docs = k + 1, []
    if docs:
        yield k, docs


def run_task(stage: Stage, config: DataConfig, work: Store, part: Partition, j: int, of: int
             ) -> None:
    """Write the missing chunk files ``k ≡ j (mod of)`` of ``part`` for ``stage``."""
    if read_file(work, part.index).exists():
        chunks = read_stats(work, part.index)["chunks"]
        if all(chunk_file(work, stage, part.index, k).exists() for k in range(j, chunks, of)):
            return
    state = _state(config, work) if stage == "process" else None
    weight = parse_spec(config.input[part.source])[1]
    opts, read = config.read_options, Counter()
    chunks = 0
    for k, docs in _chunks(config, part.spec, opts, read):
        chunks = k + 1
        path = chunk_file(work, stage, part.index, k)
        if k % of == j and not path.exists():
            path.save_arrays(**(_count(docs) if state is None else _process(state, docs, weight)))
    if j == 0:
        read_file(work, part.index).write_text(
            json.dumps({"chunks": chunks, **read, **opts.issues}))


_STATE: dict[str, dict[str, Any]] = {}  # what a worker process builds once per run


def _state(config: DataConfig, work: Store) -> dict[str, Any]:
    """The process stage's tools (filters, hasher, tokenizer, boilerplate set), built once per
    worker process and run (the boilerplate set exists only once the count stage is done)."""
    key = json.dumps([str(work), to_dict(config)], sort_keys=True)
    if key not in _STATE:
        _STATE.clear()
        dedup = config.dedup_config
        tok = Tokenizer.load(config.tokenizer)
        _STATE[key] = dict(
            filters=config.build_filters(), mask_pii=config.mask_pii, dedup=dedup,
            hasher=MinHasher(dedup), tok=tok, eot=tok.token_id(ENDOFTEXT),
            dtype=token_dtype(tok.vocab_size), rejects=config.rejects,
            val_fraction=config.val_fraction, quarantine=config.utf8_errors == "quarantine",
            boilerplate=boilerplate.load(work) if config.boilerplate_lines else None)
    return _STATE[key]


def _count(docs: list[Document]) -> dict[str, np.ndarray]:
    values, counts = boilerplate.chunk_counts(normalize(d.text) for d in docs)
    return {"values": values, "counts": counts}


def _repeats(name: str, weight: float) -> int:
    """How many copies of a training document a source weight asks for (fractions by hash)."""
    whole = int(weight)
    return whole + (hash_fraction("weight:" + name) < weight - whole)


def _process(w: dict[str, Any], docs: list[Document], weight: float) -> dict[str, np.ndarray]:
    """Filter verdicts, statistics, dedup keys, split and tokens of one chunk."""
    reasons, languages, kept, kept_names, rejected, rejected_names = [], [], [], [], [], []
    pii: Counter = Counter()
    lines_removed = documents_touched = 0
    for doc in docs:
        text = normalize(doc.text)
        language = None
        if w["boilerplate"] is not None:
            text, removed = boilerplate.remove_lines(text, w["boilerplate"])
            lines_removed += removed
            documents_touched += removed > 0
        if w["mask_pii"]:
            text, found = mask_pii(text)
            pii.update(found)
        if not text.strip():
            reason = "empty:empty"
        elif doc.replaced_bytes and w["quarantine"]:
            reason = "utf8:invalid_utf8"
        else:
            result = apply_filters(w["filters"], text)
            reason, text = (None, result.text) if result.keep else (result.reason, text)
            language = result.language
        reasons.append(reason or "")
        languages.append(language or "")
        if reason is None:
            kept.append(text)
            kept_names.append(doc.name)
        elif w["rejects"]:
            rejected.append(text)
            rejected_names.append(doc.name)
    dedup = w["dedup"]
    tokens = w["tok"].encode_batch(kept, workers=1) if kept else []
    val = np.array([is_validation(n, w["val_fraction"]) for n in kept_names], dtype=bool)
    return {
        "reasons": np.array(reasons, dtype=str),
        "languages": np.array(languages, dtype=str),  # "" where no language filter ran
        "pii": np.array([pii[t] for t in PII_TYPES], dtype=np.int64),  # masked, per type
        "boilerplate": np.array([lines_removed, documents_touched], dtype=np.int64),
        # exact keys as two uint64 words; one uint64 per LSH band
        "keys": np.frombuffer(b"".join(map(exact_key, kept)), "<u8").reshape(-1, 2),
        "bands": band_keys(w["hasher"].signatures(kept), dedup.bands, dedup.rows)
        if dedup.near else np.zeros((len(kept), 0), np.uint64),
        "val": val,
        "repeats": np.array([1 if v else _repeats(n, weight) for n, v in zip(kept_names, val,
                                                                              strict=True)],
                            dtype=np.int64),
        "lengths": np.array([len(t) + 1 for t in tokens], dtype=np.int64),
        "tokens": np.concatenate([np.append(t, w["eot"]) for t in tokens]).astype(w["dtype"])
        if tokens else np.zeros(0, w["dtype"]),
        "rejected": np.array(rejected, dtype=str),
        "rejected_names": np.array(rejected_names, dtype=str),
    }
