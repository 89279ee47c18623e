"""lmforge: build a language model from scratch, end to end."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmforge.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from lmforge.tokenizer import Tokenizer


def load(path: str, device: str = "cpu", dtype: str | None = None
         ) -> tuple[nn.Module, Tokenizer]:
    """``model, tokenizer = lmforge.load(PATH)``: a run directory, a checkpoint file, a quantized
    model file (``lmforge quantize``) or a Hugging Face Llama directory.

    ``model(ids)`` maps int64 ids (batch, time) to logits (batch, time, vocab). ``dtype`` ("fp32"
    or "bf16") casts the model's floating-point weights; None keeps them as stored (checkpoints:
    fp32; quantized files: the dtype they were evaluated in).
    """
    from lmforge.hardware import DTYPES
    from lmforge.train.checkpoint import load_model

    model, tokenizer = load_model(path, device)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model = model.to(DTYPES[dtype])
    return model, tokenizer
