"""Calibration data for GPTQ and AWQ: where it comes from and how it runs through a model.

Calibration windows come from the *end* of the validation split and evaluation windows from its
start (the same windows training validated on), and :func:`calibration_batches` refuses to let
them overlap, so the bpb measured after quantization is not on text the method fitted to.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.data.loader import TokenLoader
from lmforge.errors import InputError


def calibration_batches(data_dir: str | Path, batch_size: int, seq_len: int, batches: int,
                        first_token: int, device: str | torch.device = "cpu"
                        ) -> tuple[list[Tensor], tuple[int, int]]:
    """The last ``batches`` batches of int64 ids (batch_size, seq_len) of the validation stream
    (in the sequential loader's window grid), and the [start, end) range of stream positions
    they cover. InputError when they would start before ``first_token``, where the evaluation
    windows end."""
    loader = TokenLoader(data_dir, "val", batch_size, seq_len, mode="sequential", device=device)
    available = loader.num_windows // batch_size
    loader.step = available - batches
    start = loader.step * batch_size * seq_len
    if loader.step < 0 or start < first_token:
        raise InputError(f"{data_dir}: the validation split ({loader.num_tokens} tokens) is too "
                         f"small for {batches} calibration batches of {batch_size}×{seq_len} "
                         f"after the {first_token} tokens of the evaluation windows; lower "
                         "calibration_batches, eval_batches or batch_size")
    ids = [loader.next_batch()[0] for _ in range(batches)]
    return ids, (start, available * batch_size * seq_len)


@torch.no_grad()
def run_calibration(model: nn.Module, batches: list[Tensor],
                    hooks: dict[nn.Module, Callable[[Tensor], None]]) -> None:
    """Run every batch of ids (B, T) through ``model``; ``hooks[m](x)`` sees each input ``x``
    (B, T, in) of module ``m`` (forward pre-hooks, removed afterwards)."""
    handles = [m.register_forward_pre_hook(lambda _m, args, fn=fn: fn(args[0]))
               for m, fn in hooks.items()]
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in handles:
            h.remove()
