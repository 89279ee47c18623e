"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False
                 ) -> list[dict]:
    """Decay 2-D weight matrices; never norms or biases (1-D), embeddings only if asked.

    Decaying a gain or a bias pulls it towards 0, which is not a simpler function, just a
    different one (as in GPT-3, Llama and nanoGPT). A tied embedding/LM-head matrix counts as an
    embedding. Parameters are visited once, so tied weights are not listed twice.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, keep = [], []
    for p in model.parameters():  # deduplicated by identity
        if not p.requires_grad:
            continue
        is_embedding = id(p) in embeddings
        (decay if p.ndim >= 2 and (decay_embeddings or not is_embedding) else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    decay_embeddings: bool = False) -> torch.optim.AdamW:
    # fused kernels where the device has them (CUDA); the default foreach path elsewhere.
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay, decay_embeddings), lr=lr,
                             betas=betas, eps=1e-8, fused=fused or None)


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 0 to ``lr`` over ``warmup`` steps, then cosine decay to
    ``min_ratio · lr`` at ``total`` steps (and flat after)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
