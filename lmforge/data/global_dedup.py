"""Deduplication over the whole corpus, across partitions, with nothing held whole in memory:
the stages datatrove's and NeMo Curator's MinHash deduplication use, for exact keys and LSH bands.

1. **index** (a task per partition): every document that passed the filters gets its id,
   ``partition << 32 | position`` (so ids sort in reading order), and its entries are written
   sorted by bucket, with the offset where each bucket starts: ``.work/dedup/PPPPP.exact.npy``
   (key words, id; bucket ``key mod E``) and ``PPPPP.near.npy`` (band key, id; bucket
   ``band · S + key mod S``). The task also totals its chunks' statistics into ``PPPPP.json``,
   its completion marker.
2. **buckets** (a task per bucket): one bucket's entries from every partition (a slice of each
   file, memory-mapped); entries with the same key form a group, and each member but the lowest
   id gives an edge to that lowest id (:func:`lmforge.data.dedup.duplicate_edges`):
   ``.work/dedup/exact_BBBBB.npy``, ``near_BBBBB.npy``.
3. **clusters** (once): the first ends of exact edges are the exact duplicates; the connected
   components of the band edges are the near-duplicate clusters, each keeping its lowest id, and
   the others not already exact duplicates are the near duplicates: ``.work/dedup/removed.npy``.

This removes what the single-process definition removes (exact duplicates, then clusters of the
rest): an exact duplicate has its first copy's band keys, so it shares every bucket with that
copy, joins only that copy's component, and never is a component's lowest id. ``E`` and ``S``
grow with the corpus, :data:`BUCKET_ENTRIES` documents per bucket, so a bucket task's memory
does not; the clusters stage holds the edges, one per duplicate.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.data.dedup import DedupConfig, connected_components, duplicate_edges
from lmforge.data.pii import TYPES as PII_TYPES
from lmforge.data.process import chunk_file
from lmforge.data.storage import Store

BUCKET_ENTRIES = 1 << 21  # documents per bucket (16–24 bytes each), before E or S grows


@dataclass(frozen=True)
class Plan:
    """How the dedup entries are spread over buckets: fixed by the corpus, not the machine."""

    exact: bool
    near: bool
    bands: int
    exact_buckets: int  # E
    near_splits: int  # S, buckets per band

    @classmethod
    def for_corpus(cls, documents: int, dedup: DedupConfig) -> Plan:
        buckets = max(1, -(-documents // BUCKET_ENTRIES))
        return cls(dedup.exact, dedup.near, dedup.bands, buckets, buckets)

    def buckets(self) -> list[tuple[str, int]]:
        """Every (kind, bucket) task of the buckets stage."""
        exact = [("exact", b) for b in range(self.exact_buckets)] if self.exact else []
        near = [("near", b) for b in range(self.bands * self.near_splits)] if self.near else []
        return exact + near


def _folder(work: Store) -> Store:
    return work / "dedup"


def summary_file(work: Store, partition: int) -> Store:
    return _folder(work) / f"{partition:05d}.json"


def _bucketed(entries: np.ndarray, bucket: np.ndarray, n_buckets: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """``entries`` sorted by ``bucket`` (stable), and the offset where each bucket starts."""
    order = np.argsort(bucket, kind="stable")
    offsets = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
    return entries[order], offsets.astype(np.int64)


def index_partition(work: Store, partition: int, chunks: int, plan: Plan) -> dict[str, Any]:
    """Stage 1 for one partition; returns (and writes) its summary: ``kept`` documents, drops
    per filter, languages, PII and boilerplate counts."""
    marker = summary_file(work, partition)
    if marker.exists():
        return json.loads(marker.read_text())
    keys, bands = [], []
    drops: Counter = Counter()
    languages: dict[str, Counter] = {}
    pii = np.zeros(len(PII_TYPES), np.int64)
    lines = np.zeros(2, np.int64)
    for k in range(chunks):
        z = chunk_file(work, "process", partition, k).load_arrays(
            "reasons", "languages", "pii", "boilerplate", "keys", "bands")
        reasons = z["reasons"].tolist()
        drops.update(r.split(":")[0] for r in reasons if r)
        for language, reason in zip(z["languages"].tolist(), reasons, strict=True):
            if language:
                languages.setdefault(language, Counter())["dropped" if reason else "kept"] += 1
        pii += z["pii"]
        lines += z["boilerplate"]
        keys.append(z["keys"])
        bands.append(z["bands"])
    key = np.concatenate(keys) if keys else np.zeros((0, 2), np.uint64)
    kept = len(key)
    ids = (np.uint64(partition) << np.uint64(32)) | np.arange(kept, dtype=np.uint64)
    if plan.exact:
        entries = np.column_stack([key, ids])
        _save_buckets(work, partition, "exact", *_bucketed(
            entries, key[:, 1] % np.uint64(plan.exact_buckets), plan.exact_buckets))
    if plan.near:
        band = np.concatenate(bands) if bands else np.zeros((0, plan.bands), np.uint64)
        splits = np.uint64(plan.near_splits)
        entries = np.column_stack([band.ravel(), np.repeat(ids, plan.bands)])
        bucket = (np.tile(np.arange(plan.bands, dtype=np.uint64), kept) * splits
                  + band.ravel() % splits)
        _save_buckets(work, partition, "near", *_bucketed(entries, bucket,
                                                          plan.bands * plan.near_splits))
    summary = {"kept": kept, "filters": dict(drops),
               "languages": {lang: dict(c) for lang, c in languages.items()},
               "pii": pii.tolist(), "boilerplate": lines.tolist()}
    marker.write_text(json.dumps(summary))
    return summary


def _save_buckets(work: Store, partition: int, kind: str, entries: np.ndarray,
                  offsets: np.ndarray) -> None:
    (_folder(work) / f"{partition:05d}.{kind}.npy").save_array(entries)
    (_folder(work) / f"{partition:05d}.{kind}_index.npy").save_array(offsets)


def _edges_file(work: Store, kind: str, bucket: int) -> Store:
    return _folder(work) / f"{kind}_{bucket:05d}.npy"


def bucket_edges(work: Store, kind: str, bucket: int, partitions: int) -> None:
    """Stage 2 for one bucket: its duplicate edges, (member, lowest id) rows."""
    path = _edges_file(work, kind, bucket)
    if path.exists():
        return
    parts = []
    for p in range(partitions):
        offsets = (_folder(work) / f"{p:05d}.{kind}_index.npy").load_array()
        parts.append((_folder(work) / f"{p:05d}.{kind}.npy").rows(offsets[bucket],
                                                                   offsets[bucket + 1]))
    entries = np.concatenate(parts)
    members, heads = duplicate_edges(entries[:, :-1], entries[:, -1])
    path.save_array(np.column_stack([members, heads]).astype(np.uint64))


def _edges(work: Store, plan: Plan, kind: str) -> np.ndarray:
    return np.concatenate([np.zeros((0, 2), np.uint64)] +
                          [_edges_file(work, k, b).load_array() for k, b in plan.buckets()
                           if k == kind])


def removed_file(work: Store) -> Store:
    return _folder(work) / "removed.npy"


def clusters(work: Store, plan: Plan) -> dict[str, int]:
    """Stage 3: the ids of the documents to remove, sorted, into ``removed.npy``; returns how
    many are exact and near duplicates (kept in ``removed.json`` for a resumed run)."""
    counts_file = _folder(work) / "removed.json"
    if counts_file.exists():
        return json.loads(counts_file.read_text())
    exact = np.unique(_edges(work, plan, "exact")[:, 0])
    near_edges = _edges(work, plan, "near")
    nodes = np.unique(near_edges)
    local = np.searchsorted(nodes, near_edges)
    label = connected_components(local[:, 0], local[:, 1], len(nodes))
    near = np.setdiff1d(nodes[label != np.arange(len(nodes))], exact)
    removed_file(work).save_array(np.union1d(exact, near).astype(np.uint64))
    counts = {"exact": len(exact), "near": len(near)}
    counts_file.write_text(json.dumps(counts))
    return counts


def removed_in(work: Store, partition: int) -> np.ndarray:
    """Positions (among the documents that passed the filters) of ``partition``'s duplicates."""
    path = removed_file(work)
    if not path.exists():
        return np.zeros(0, np.int64)
    removed = path.load_array()  # one id per duplicate
    lo, hi = np.searchsorted(removed, [np.uint64(partition) << np.uint64(32),
                                       np.uint64(partition + 1) << np.uint64(32)])
    return (removed[lo:hi] & np.uint64(0xFFFFFFFF)).astype(np.int64)
