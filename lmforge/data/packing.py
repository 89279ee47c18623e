"""The last stage of ``lmforge data prepare``: a partition's surviving documents into shards.

A task per partition reads its chunk files in order, leaves out the duplicates
(:func:`lmforge.data.global_dedup.removed_in`), sends each document to the validation or the
training split (repeated as its source's weight asks) and streams them into shards of about
``shard_tokens`` tokens (a shard holds whole documents: a new one starts once the current one
has reached the size). Shards are written into ``.work/out/`` as ``PPPPP_SPLIT_NNNNN.bin`` and
renamed ``SPLIT_NNNNN.bin`` in partition order when the run is published; with ``rejects`` the
dropped documents go to ``PPPPP.rejects.jsonl``. ``.work/write/PPPPP.json``, written last, lists
what the task wrote: the task's completion marker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np

from lmforge.data.global_dedup import removed_in
from lmforge.data.output import STAGE
from lmforge.data.prepare_config import DataConfig
from lmforge.data.process import chunk_file
from lmforge.data.shards import shard_writer
from lmforge.data.storage import Store


def marker_file(work: Store, partition: int) -> Store:
    return work / "write" / f"{partition:05d}.json"


def rejects_file(work: Store, partition: int) -> Store:
    return work / STAGE / f"{partition:05d}.rejects.jsonl"


class _Split:
    """The shards of one split of one partition, written one after another."""

    def __init__(self, folder: Store, partition: int, split: str, dtype: np.dtype,
                 shard_tokens: int) -> None:
        self.folder, self.partition, self.split = folder, partition, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._add: Callable[[np.ndarray], None] | None = None
        self._open = ExitStack()

    def add(self, tokens: np.ndarray) -> None:
        if self._add is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self._open.close()  # the finished shard appears under its name
            name = f"{self.partition:05d}_{self.split}_{len(self.shards):05d}.bin"
            local = self._open.enter_context((self.folder / name).writing())
            self._add = self._open.enter_context(shard_writer(local, self.dtype))
            self.shards.append({"path": name, "split": self.split, "tokens": 0, "documents": 0})
        self._add(tokens)
        self.shards[-1]["tokens"] += len(tokens)
        self.shards[-1]["documents"] += 1

    def __enter__(self) -> _Split:
        return self

    def __exit__(self, *error: Any) -> None:
        """Finish the last shard, or on an error drop it."""
        self._open.__exit__(*error)


def write_partition(config: DataConfig, work: Store, partition: int, chunks: int,
                    dtype: np.dtype) -> dict[str, Any]:
    """Write ``partition``'s shards (and rejects); returns its marker: ``shards`` (name in
    ``.work/out``, split, tokens, documents) and ``rejects`` (documents written there)."""
    marker = marker_file(work, partition)
    if marker.exists():
        return json.loads(marker.read_text())
    removed = removed_in(work, partition)
    position = rejects = 0
    with ExitStack() as stack:
        splits = {name: stack.enter_context(_Split(work / STAGE, partition, name, dtype,
                                                   config.shard_tokens))
                  for name in ("train", "val")}
        if config.rejects:
            local = stack.enter_context(rejects_file(work, partition).writing())
            rejected = stack.enter_context(open(local, "w", encoding="utf-8"))
        for k in range(chunks):
            z = chunk_file(work, "process", partition, k).load_arrays(
                "lengths", "tokens", "val", "repeats",
                *(("reasons", "rejected_names", "rejected") if config.rejects else ()))
            lengths, tokens, val, repeats = z["lengths"], z["tokens"], z["val"], z["repeats"]
            ends = np.cumsum(lengths)
            drop = np.isin(np.arange(position, position + len(ends)), removed)
            position += len(ends)
            for i in np.flatnonzero(~drop):
                doc = tokens[ends[i] - lengths[i]:ends[i]]
                split = splits["val" if val[i] else "train"]
                for _ in range(int(repeats[i])):
                    split.add(doc)
            if config.rejects:
                reasons = [r for r in z["reasons"].tolist() if r]
                for name, reason, text in zip(z["rejected_names"].tolist(), reasons,
                                              z["rejected"].tolist(), strict=True):
                    rejected.write(json.dumps({"name": name, "reason": reason, "text": text})
                                   + "\n")
                    rejects += 1
    result = {"shards": [s for split in splits.values() for s in split.shards],
              "rejects": rejects}
    marker.write_text(json.dumps(result))
    return result
