"""``with evaluating(model):`` — the model in eval mode (dropout off) for the block, and back in
the mode it was in afterwards, also when the block raises. Every stage that runs a model that may
be training (validation, samples, generation, calibration) uses it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
