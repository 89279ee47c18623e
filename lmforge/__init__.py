"""lmforge: build a language model from scratch, end to end."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lmforge.loading import Loaded

try:
    __version__ = version("lmforge")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def load(path: str, device: str | torch.device = "cpu", dtype: str | None = None,
         merge_adapters: bool = True) -> Loaded:
    """``model, tokenizer = lmforge.load(PATH)``: a run directory, a checkpoint file, a quantized
    model file (``lmforge quantize``) or a Hugging Face Llama directory.

    ``model(ids)`` maps int64 ids (batch, time) to logits (batch, time, vocab). ``dtype`` ("fp32"
    or "bf16") casts the model's floating-point weights; None keeps them as stored (checkpoints:
    fp32; quantized files: the dtype they were evaluated in). The result also says what was
    opened: ``.kind``, ``.source``, ``.dtype``, ``.quantization``, ``.run`` (see
    :class:`lmforge.loading.Loaded`). A LoRA fine-tuning run opens with its adapters merged
    into the weights, or kept apart with ``merge_adapters=False``.
    """
    from lmforge.loading import open_model

    return open_model(path, device, dtype, merge_adapters)
