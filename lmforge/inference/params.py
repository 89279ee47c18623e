"""``SamplingParams``: how tokens are chosen, one validated object for the engine, the CLI,
chat, training-time samples, and next the server and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.config import check_at_least, option
from lmforge.errors import ConfigError


@dataclass
class SamplingParams:
    """Sampling settings (defaults: temperature 0.8 with top-k 50; :meth:`greedy` for argmax).

    Applied in this order: repetition penalty → greedy if temperature is 0, else temperature →
    top-k → top-p → draw."""

    max_new_tokens: int = option(256, "most tokens to generate (also cut where the context "
                                      "ends)")
    temperature: float = option(0.8, "divide the logits by this before sampling; 0: greedy")
    top_k: int | None = option(50, "sample among the k most likely tokens; none: all")
    top_p: float | None = option(None, "sample among the most likely tokens whose "
                                        "probabilities sum to p (nucleus); none: all")
    repetition_penalty: float = option(1.0, "CTRL penalty (arXiv:1909.05858) on tokens already "
                                            "generated: > 1 discourages repeats; 1: off")
    stop: list[str] = option([], "end the text where one of these strings appears (not "
                                 "included); repeatable")
    seed: int = option(0, "seed of the sampling generator: the same seed, the same samples")

    def __post_init__(self) -> None:
        check_at_least(self, 0, "max_new_tokens")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature: must be a finite number >= 0, got "
                              f"{self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k: must be >= 1 or none, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1] or none, got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ConfigError(f"repetition_penalty: must be a finite number > 0, got "
                              f"{self.repetition_penalty}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop: must be a list of non-empty strings, got {self.stop!r}")

    @classmethod
    def greedy(cls, max_new_tokens: int = 256, **kwargs: object) -> SamplingParams:
        """Always the most likely token."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None, **kwargs)

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        """A fresh generator seeded with ``seed``, on ``device`` (where the logits are)."""
        return torch.Generator(device).manual_seed(self.seed)
