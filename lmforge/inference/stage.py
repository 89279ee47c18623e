"""``lmforge generate``: sample text from a model, streamed as it is generated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from lmforge.config import check_at_least, option
from lmforge.inference.engine import room_for
from lmforge.inference.params import SamplingParams
from lmforge.inference.text import generate_text
from lmforge.tokenizer import ENDOFTEXT


@dataclass
class GenerateConfig(SamplingParams):
    """What ``lmforge generate`` samples: the sampling settings, and these."""

    checkpoint: str = option("", "the model: run directory, checkpoint file, quantized file or "
                                 "Hugging Face directory")
    prompt: str = option("", "text to continue")
    num_samples: int = option(1, "samples to draw, one after another (one generator: "
                                 "different samples, the same ones for the same seed)")
    dtype: Literal["fp32", "bf16"] | None = option(
        None, "cast the weights (default: as stored); bf16 pays off on large models")
    compile: bool = option(False, "torch.compile the decode step (compiling takes ~20 s on 2 "
                                  "CPU cores)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, 1, "num_samples", "max_new_tokens")


def generate_samples(config: GenerateConfig, write: Callable[[str], None],
                     notify: Callable[[str], None]) -> None:
    """Open the model, then write each sample (prompt + continuation, then a ``---`` line)
    through ``write`` as it is generated; notes (a length cut to fit the context) go to
    ``notify``. Without a prompt, samples start as a new document does. Every argument is
    checked before anything is written."""
    from lmforge import load

    model, tok = load(config.checkpoint, dtype=config.dtype)
    # no prompt: begin where a document begins, after an end-of-text token
    ids = tok.encode(config.prompt) or [tok.special_tokens[s] for s in (ENDOFTEXT,)
                                        if s in tok.special_tokens]
    generator = config.generator()
    streams = [generate_text(model, tok, ids, config, generator=generator,
                             compile=config.compile) for _ in range(config.num_samples)]
    room = room_for(model, len(ids), config.max_new_tokens)
    if room < config.max_new_tokens:
        notify(f"note: max_new_tokens {config.max_new_tokens} cut to {room}: the prompt's "
               f"{len(ids)} tokens and the new ones must fit the model's context of "
               f"{model.config.context}")
    for stream in streams:
        write(config.prompt)
        for chunk in stream:
            write(chunk)
        write("\n---\n")
