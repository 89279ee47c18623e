"""``lmforge data prepare``: raw text → filtered, deduplicated token shards.

    partitions ─ read → normalize → filters → dedup keys → tokens ─ chunk files   (process)
               ─ per partition: dedup entries by bucket, statistics               (index)
               ─ per bucket: duplicate edges                                      (buckets)
               ─ connected components → the removal list                          (clusters)
               ─ per partition: survivors → train/val shards                      (write)
               → shards renamed in order + manifest.json

Every stage is a list of independent tasks (:mod:`lmforge.data.process`,
:mod:`lmforge.data.global_dedup`, :mod:`lmforge.data.packing`) that an executor runs: a local
process pool (default) or Ray (:mod:`lmforge.data.executors`); tasks talk only through files in
``DIR/.work/``, each written whole or not at all, and a task skips what is already there, so an
interrupted run (Ctrl-C, SIGTERM, a killed worker or driver) resumes where it stopped and gives
the same bytes. Deduplication is over the whole corpus; memory is bounded by the chunk, the
partition and the bucket, never the corpus (but ``boilerplate_lines`` counts every distinct
line in one process). Shards are published into ``DIR`` only at the end, with the manifest; so
an output of an earlier prepare, which is replaced only with ``force``, stays whole until the new
one is complete (:mod:`lmforge.data.output`). Without Ray, ``rank``/``world_size`` (defaults
from torchrun's ``RANK``/``WORLD_SIZE`` or Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``) give each
machine the documents whose name hashes to it; it writes ``DIR/rank_NNNNN/`` (deduplicated
within the rank), and ``lmforge data merge DIR`` combines the rank manifests.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import to_dict
from lmforge.data import boilerplate
from lmforge.data.executors import Executor, make_executor, terminate_as_interrupt
from lmforge.data.global_dedup import Plan, bucket_edges, clusters, index_partition
from lmforge.data.manifest import load_manifest, totals
from lmforge.data.output import REJECTS, STAGE, claim, finished, publish
from lmforge.data.packing import rejects_file, write_partition
from lmforge.data.pii import TYPES as PII_TYPES
from lmforge.data.prepare_config import DataConfig, normalize
from lmforge.data.process import (
    Partition,
    chunk_file,
    count_chunks,
    list_partitions,
    read_stats,
    run_task,
)
from lmforge.data.shards import token_dtype
from lmforge.data.sources import parse_spec
from lmforge.data.storage import Store
from lmforge.errors import InputError
from lmforge.tokenizer import ENDOFTEXT, Tokenizer

__all__ = ["DataConfig", "normalize", "prepare"]

log = logging.getLogger(__name__)

MAX_SHARE = 8  # most tasks sharing one partition


def _fingerprint(config: DataConfig, tok: Tokenizer) -> str:
    # Options added later count only when set, so older outputs stay valid.
    relevant = {k: v for k, v in to_dict(config).items()
                if k not in ("workers", "progress", "force", "executor", "ray_address")
                and not (k in ("languages", "mask_pii", "boilerplate_lines") and not v)}
    relevant["tokenizer"] = tok.fingerprint
    relevant["layout"] = 2  # partitioned stages and global dedup
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


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
        executor = make_executor(config.executor, config.ray_address, config.workers,
                                 config.progress)
        try:
            with terminate_as_interrupt():
                manifest, files = _run(config, tok, work, executor)
        finally:
            executor.close()
        manifest["fingerprint"] = fingerprint
        publish(out, work, files, manifest)
    except BaseException:
        _keep_if_resumable(work)
        raise
    return load_manifest(out)


def _run(config: DataConfig, tok: Tokenizer, work: Store, executor: Executor
         ) -> tuple[dict[str, Any], dict[str, str]]:
    """Every stage; the manifest and the files to publish (name in ``.work/out`` → in DIR)."""
    parts = list_partitions(config)
    # Tasks per partition, to keep every worker busy when partitions are few; each reads the
    # whole partition, so reading costs that many times over (JSONL: ~2% of the work per task).
    share = min(MAX_SHARE, -(-executor.slots // len(parts)))
    if config.boilerplate_lines and boilerplate.load(work) is None:  # a resumed run has it
        executor.map(run_task, [("count", config, work, p, j, share) for p in parts
                                for j in range(share)], "count lines",
                     (" chunks", lambda: count_chunks(work, "count")))
        counter = boilerplate.LineCounter()
        for p in parts:
            for k in range(read_stats(work, p.index)["chunks"]):
                z = chunk_file(work, "count", p.index, k).load_arrays("values", "counts")
                counter.add(z["values"], z["counts"])
        boilerplate.save(work, counter.frequent(config.boilerplate_lines))
        log.info("boilerplate: %d distinct lines counted", counter.distinct)
    executor.map(run_task, [("process", config, work, p, j, share) for p in parts
                            for j in range(share)], "filter+tokenize",
                 (" chunks", lambda: count_chunks(work, "process")))
    read = [read_stats(work, p.index) for p in parts]
    _check_sources(config, parts, read)

    plan = Plan.for_corpus(sum(r["documents"] for r in read), config.dedup_config)
    summaries = executor.map(index_partition, [(work, p.index, r["chunks"], plan)
                                               for p, r in zip(parts, read, strict=True)],
                             "dedup index")
    removed = {"exact": 0, "near": 0}
    if plan.exact or plan.near:
        executor.map(bucket_edges, [(work, kind, b, len(parts)) for kind, b in plan.buckets()],
                     "dedup buckets")
        removed = clusters(work, plan)
    dtype = token_dtype(tok.vocab_size)
    written = executor.map(write_partition, [(config, work, p.index, r["chunks"], dtype)
                                             for p, r in zip(parts, read, strict=True)],
                           "write shards")
    shards, files = _final_names(written)
    if config.rejects:
        _join_rejects(work, parts)
        files[REJECTS] = REJECTS
    if config.val_fraction and not any(s["split"] == "val" for s in shards):
        log.warning("no validation split: none of the %d documents fell in --val-fraction %g; "
                    "raise --val-fraction to get one",
                    sum(s["documents"] for s in shards), config.val_fraction)
    stats = _stats(config, work, read, summaries, removed, plan, len(parts))
    manifest = {"shards": shards, **totals(shards), "dtype": dtype.name,
                "tokenizer": {"path": str(Path(config.tokenizer).resolve()),
                              "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
                "stats": stats, "config": to_dict(config)}
    return manifest, files


def _check_sources(config: DataConfig, parts: list[Partition], read: list[dict]) -> None:
    seen = Counter()
    for part, r in zip(parts, read, strict=True):
        seen[part.source] += r["seen"]
    for source, spec in enumerate(config.input):
        if not seen[source]:
            raise InputError(f"{parse_spec(spec)[0]}: yields no document (empty file?)")


def _final_names(written: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The manifest's shard list, numbered per split in partition order, and the renames."""
    shards, files = [], {}
    number: Counter = Counter()
    for split in ("train", "val"):
        for part in written:
            for shard in part["shards"]:
                if shard["split"] == split:
                    name = f"{split}_{number[split]:05d}.bin"
                    number[split] += 1
                    files[shard["path"]] = name
                    shards.append({**shard, "path": name})
    return shards, files


def _join_rejects(work: Store, parts: list[Partition]) -> None:
    with (work / STAGE / REJECTS).writing() as local, open(local, "wb") as joined:
        for p in parts:
            joined.write(rejects_file(work, p.index).read_bytes())


def _stats(config: DataConfig, work: Store, read: list[dict], summaries: list[dict],
           removed: dict[str, int], plan: Plan, partitions: int) -> dict[str, Any]:
    """The manifest's ``stats``: what each stage read, dropped, removed and changed."""
    inputs: Counter = Counter()
    for r in read:
        inputs.update({k: v for k, v in r.items() if k not in ("chunks", "seen")})
    drops: Counter = Counter()
    for s in summaries:
        drops.update(s["filters"])
    stats: dict[str, Any] = {"input": {**inputs, "partitions": partitions},
                             "filters": dict(drops), "dedup": dict(removed)}
    if plan.exact or plan.near:
        stats["dedup"]["buckets"] = len(plan.buckets())
    if config.mask_pii:
        found = np.sum([s["pii"] for s in summaries], axis=0, dtype=np.int64)
        stats["pii"] = dict(zip(PII_TYPES, map(int, found), strict=True))
    if config.languages:
        counts: dict[str, Counter] = {}
        for s in summaries:
            for language, c in s["languages"].items():
                counts.setdefault(language, Counter()).update(c)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1].total(), kv[0]))
        stats["languages"] = {lang: {"kept": c["kept"], "dropped": c["dropped"]}
                              for lang, c in ranked}
    if config.boilerplate_lines:
        lines, touched = np.sum([s["boilerplate"] for s in summaries], axis=0, dtype=np.int64)
        stats["boilerplate"] = {"lines_removed": int(lines), "documents_touched": int(touched),
                                "distinct_lines": len(boilerplate.load(work))}
    return stats


def _keep_if_resumable(work: Store) -> None:
    """After a failure: keep ``work`` when it holds finished chunks, which a rerun of the same
    command resumes from; else remove it."""
    chunks = count_chunks(work, "count") + count_chunks(work, "process")
    if chunks or (work / boilerplate.FILE).exists():
        log.info("%s: kept %d finished chunk(s); rerun the same command to resume", work, chunks)
    else:
        work.remove_tree()  # must not hide the error being raised
