"""Sampling through ``model.forward``: the whole context is recomputed for every token.

Slow next to the KV-cache engine (:mod:`lmforge.inference`), but it only calls ``model(ids)``, so
it works on a model wrapped for training — under FSDP only ``forward`` gathers the sharded
weights, which the engine's module-by-module decoding would bypass. The training loop samples
with it; everything else uses the engine. The token choice itself is the engine's ``sample``.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.inference import sample as choose


@torch.no_grad()
def sample(model: nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 50, generator: torch.Generator | None = None,
           stop: tuple[int, ...] = ()) -> list[int]:
    """New token ids after ``prompt``, until ``max_new_tokens`` or a ``stop`` id (not returned);
    the context slides past the model's length. ``generator`` (a CPU generator) supplies the
    randomness, so sampling never disturbs the global RNG that an exact resume depends on."""
    context = model.config.context
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[:, -1].float().cpu()  # (1, vocab)
        nxt = int(choose(logits, temperature, top_k, generator=generator)[0])
        if nxt in stop:  # the stop token ends the sample and is not part of it
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return new
