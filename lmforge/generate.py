"""Simple sampling: the whole context is recomputed per token (fast decoding: ``inference/``)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sample(model: nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 50, generator: torch.Generator | None = None,
           stop: tuple[int, ...] = ()) -> list[int]:
    """New token ids after ``prompt``: softmax(logits / temperature) over the ``top_k`` most
    likely tokens (greedy when temperature is 0), until ``max_new_tokens`` or a ``stop`` id
    (which is not returned).

    Uses ``generator`` for randomness, so sampling never disturbs the global RNG (a training
    run's exact resume depends on it).
    """
    context = model.config.context
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[0, -1].float()  # (vocab,)
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        if nxt in stop:  # the stop token ends the sample and is not part of it
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return new
