"""The one rule that ties a tokenizer to a model: every token id needs an embedding row.

A model vocabulary *larger* than the tokenizer's is fine and common: it is padded to a multiple
of 64 so the embedding and LM-head matmuls tile well (nanoGPT pads GPT-2's 50,257 to 50,304,
the ``gpt2-124m`` preset). The padded rows are never a target, so they learn to be unlikely.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import InputError

PAD_MULTIPLE = 64


def check_vocab(tokenizer_vocab: int, model_vocab: int, tokenizer_source: str | Path,
                model_source: str | Path) -> None:
    """Refuse a tokenizer with ids the model has no embedding for."""
    if tokenizer_vocab > model_vocab:
        raise InputError(f"{tokenizer_source}: the tokenizer has {tokenizer_vocab} ids but the "
                         f"model in {model_source} only {model_vocab} (vocab_size); they do not "
                         "belong together: use the tokenizer the model was trained with")


def padded_vocab(tokenizer_vocab: int, preset_vocab: int) -> int:
    """The vocabulary a new model gets for a tokenizer: the preset's own size when the
    tokenizer's ids fit in it with less than one ``PAD_MULTIPLE`` to spare (the preset is that
    tokenizer's padded size, e.g. 50,304 for GPT-2's 50,257), else the tokenizer's size rounded
    up to a multiple of ``PAD_MULTIPLE``."""
    if 0 <= preset_vocab - tokenizer_vocab < PAD_MULTIPLE:
        return preset_vocab
    return -(-tokenizer_vocab // PAD_MULTIPLE) * PAD_MULTIPLE
