"""Generation as streamed text, ending at stop strings as well as stop ids.

A stop string can span several tokens and can begin in the middle of one, so it is matched on the
decoded text, not on ids. Text that might be the start of a stop string is held back until the
next tokens show whether it is: the chunks streamed out, joined, are exactly the final text, and
neither a stop string nor anything after it is ever emitted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmforge.inference.engine import generate
from lmforge.inference.params import SamplingParams
from lmforge.model import Transformer
from lmforge.tokenizer import ENDOFTEXT, Tokenizer
from lmforge.tokenizer.chat import END


def default_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """``<|endoftext|>`` (end of a document) and ``<|end|>`` (end of a chat turn), where the
    tokenizer has them."""
    return tuple(tokenizer.special_tokens[s] for s in (ENDOFTEXT, END)
                 if s in tokenizer.special_tokens)


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                  params: SamplingParams, *, stop_ids: Sequence[int] | None = None,
                  generator: torch.Generator | None = None, compile: bool = False
                  ) -> Iterator[str]:
    """Stream the text generated after ``prompt_ids`` in chunks, until a ``params.stop`` string
    (not emitted, nor anything after it), a stop id (default: :func:`default_stop_ids`) or
    ``params.max_new_tokens``; only the tokenizer's ids are drawn. ``generator`` and
    ``compile`` as in :func:`lmforge.inference.generate`; bad input raises here, not on the
    first ``next()``."""
    if stop_ids is None:
        stop_ids = default_stop_ids(tokenizer)
    tokens = generate(model, prompt_ids, params, stop_ids=stop_ids, generator=generator,
                      vocab_size=tokenizer.vocab_size, compile=compile)
    return _stream(tokens, tokenizer, tuple(params.stop))


def _stream(tokens: Iterator[int], tokenizer: Tokenizer, stop: tuple[str, ...]
            ) -> Iterator[str]:
    decoder = tokenizer.stream_decoder()
    pending = ""  # decoded, not yet emitted: it may hold the beginning of a stop string
    for token in tokens:
        pending += decoder.push(token)
        cut = _first_stop(pending, stop)
        if cut is not None:
            if cut:
                yield pending[:cut]
            return
        keep = _held_back(pending, stop)
        if keep < len(pending):
            yield pending[:len(pending) - keep]
            pending = pending[len(pending) - keep:]
    pending += decoder.flush()
    cut = _first_stop(pending, stop)
    pending = pending if cut is None else pending[:cut]
    if pending:
        yield pending


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop string in ``text`` begins, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
