"""lmforge: build a language model from scratch, end to end."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from lmforge.tokenizer import Tokenizer


def load(path: str, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """``model, tokenizer = lmforge.load(PATH)``: a run directory, a checkpoint file or a Hugging
    Face Llama directory.

    ``model(ids)`` maps int64 ids (batch, time) to logits (batch, time, vocab).
    """
    from lmforge.train.checkpoint import load_model

    return load_model(path, device)
