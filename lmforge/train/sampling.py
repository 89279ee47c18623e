"""Samples during training, through ``model.forward``: the whole context is recomputed for every
token.

Slow next to the KV-cache engine (:mod:`lmforge.inference`), but it only calls ``model(ids)``, so
it works on a model wrapped for training — under FSDP only ``forward`` gathers the sharded
weights, which the engine's module-by-module decoding would bypass. The training loop samples
with it; everything else uses the engine. The token choice itself is the engine's ``sample``.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.evaluating import evaluating
from lmforge.inference import SamplingParams
from lmforge.inference import sample as choose


@torch.no_grad()
def forward_sample(model: nn.Module, prompt: list[int], params: SamplingParams,
                   stop: tuple[int, ...] = (), vocab_size: int | None = None) -> list[int]:
    """New token ids after ``prompt``, until ``params.max_new_tokens`` or a ``stop`` id (not
    returned), drawn among ids below ``vocab_size`` (the tokenizer's); the context slides past
    the model's length. A generator seeded with
    ``params.seed`` supplies the randomness, so sampling never disturbs the global RNG that an
    exact resume depends on."""
    context = model.config.context
    device = next(model.parameters()).device
    generator = params.generator()  # the logits are moved to the CPU to be sampled
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    with evaluating(model):
        for _ in range(params.max_new_tokens):
            logits = model(ids[:, -context:])[:, -1].float().cpu()  # (1, vocab)
            nxt = int(choose(logits, params, generator, vocab_size=vocab_size)[0])
            if nxt in stop:  # the stop token ends the sample and is not part of it
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return new
