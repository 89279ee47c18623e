"""The training data loader: (input, target) windows from memory-mapped token shards.

The shards of a split are one virtual token stream, cut into non-overlapping windows of
``seq_len + 1`` tokens (consecutive windows share their boundary token, so every token is once a
target). Two modes:

* ``random``: each epoch visits every window once, in an order drawn from a generator seeded with
  (seed, epoch);
* ``sequential``: windows in stream order.

Batches are *slots* of that order: the k-th ``next_batch()`` on rank r of W takes global slot
``k·W + r``. So ranks read disjoint windows, and one process with W× the gradient accumulation reads
exactly the windows that W data-parallel ranks read together. Batch k is a function of k alone:
resuming needs only the number of batches drawn (``state_dict()``), and a resumed run sees exactly
the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.data.manifest import load_manifest
from lmforge.data.shards import Shard
from lmforge.errors import ConfigError, InputError

Mode = Literal["random", "sequential"]


class TokenLoader:
    """``next_batch()`` → ``(x, y)``: int64 (batch_size, seq_len) tensors, y is x shifted by one."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int,
                 mode: Mode = "random", seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu") -> None:
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        if mode not in ("random", "sequential"):
            raise ConfigError(f"mode: {mode!r} is not one of 'random', 'sequential'")
        manifest = load_manifest(data_dir)
        paths = [Path(data_dir) / s["path"] for s in manifest["shards"] if s["split"] == split]
        if not paths:
            raise InputError(f"{data_dir}: no {split!r} shards in manifest.json")
        self.shards = [Shard(p) for p in paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # stream offset per shard
        self.num_tokens = int(self.starts[-1])
        self.num_windows = (self.num_tokens - 1) // seq_len
        if self.num_windows < batch_size * world_size:
            raise InputError(f"{data_dir}: the {split!r} split has {self.num_tokens} tokens, too "
                             f"few for batches of {batch_size}×{seq_len} on {world_size} rank(s)")
        self.batch_size, self.seq_len, self.mode = batch_size, seq_len, mode
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.step = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, window order) cache

    def _read(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens of the stream from ``start``, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            pos = start + filled
            k = int(np.searchsorted(self.starts, pos, side="right")) - 1
            shard, offset = self.shards[k], pos - int(self.starts[k])
            take = min(length - filled, len(shard) - offset)
            out[filled : filled + take] = shard.tokens[offset : offset + take]
            filled += take
        return out

    def _window_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.num_windows))
        return self._order[1]

    def _starts(self) -> list[int]:
        """Stream offsets of this batch's windows."""
        slot = self.step * self.world_size + self.rank
        starts = []
        for g in range(slot * self.batch_size, (slot + 1) * self.batch_size):
            epoch, j = divmod(g, self.num_windows)
            window = self._window_order(epoch)[j] if self.mode == "random" else j
            starts.append(int(window) * self.seq_len)
        return starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.stack([self._read(s, self.seq_len + 1) for s in self._starts()])
        self.step += 1
        batch = torch.from_numpy(windows)  # (B, T + 1)
        x, y = batch[:, :-1], batch[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "mode": self.mode, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the data and the batch geometry must be the same."""
        for key in ("mode", "seed", "rank", "world_size", "batch_size", "seq_len", "num_tokens"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(f"loader state does not match this loader: {key} was "
                                  f"{state.get(key)!r}, is {getattr(self, key)!r}")
        self.step = int(state["step"])
