"""Direct preference optimization (arXiv:2305.18290) on the shared training loop: each batch is
B chosen and B rejected replies to the same prompts, the loss compares the policy's log-prob
margins with the reference's.

The reference is the base model as it was (:func:`~lmforge.finetune.run.reference_for`): a
frozen copy, or — with LoRA — the same model with its adapters switched off, so no second copy is
held in memory.

    lmforge finetune dpo --checkpoint SFT_RUN --data pairs.jsonl --out runs/dpo [--lora-rank 8]
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.data.chat_batches import (
    PreferenceBatches,
    count_tokens,
    pad_id_of,
    pad_rows,
    pair_rows,
    render_pairs,
)
from lmforge.evaluating import evaluating
from lmforge.finetune.config import DPOConfig
from lmforge.finetune.objectives import DPOOutput, dpo_loss, sequence_logprobs
from lmforge.finetune.run import (
    Reference,
    finish,
    open_base,
    preference_rows,
    reference_for,
    rendered_split,
    run_info,
)
from lmforge.train.distributed import init_distributed, shutdown_distributed
from lmforge.train.loop import autocast_for, fit, optimizer_for

log = logging.getLogger(__name__)

def preference_figures(out: DPOOutput) -> dict[str, float]:
    """What DPO logs: the implicit rewards, their margin and the preference accuracy."""
    return {"reward_chosen": float(out.chosen_rewards.mean()),
            "reward_rejected": float(out.rejected_rewards.mean()),
            "reward_margin": float(out.margin), "pref_accuracy": float(out.accuracy)}


def dpo_batch_loss(model: nn.Module, batch: tuple[Tensor, Tensor], reference: Reference,
                   beta: float) -> DPOOutput:
    """DPO on one preference batch: rows [:B] chosen, [B:] rejected."""
    ids, targets = batch
    half = ids.shape[0] // 2
    policy = sequence_logprobs(model, ids, targets)
    ref = reference(sequence_logprobs, ids, targets)
    return dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta)


@torch.no_grad()
def held_out_preferences(model: nn.Module, pairs: list, reference: Reference, config: DPOConfig,
                         pad: int, device: torch.device, autocast: AbstractContextManager
                         ) -> dict[str, float]:
    """DPO loss, reward margin and preference accuracy over held-out pairs."""
    sums: dict[str, float] = {}
    with evaluating(model):
        for start in range(0, len(pairs), config.batch_size):
            chunk = pairs[start:start + config.batch_size]
            ids, targets = pad_rows(pair_rows(chunk), pad)
            with autocast:
                out = dpo_batch_loss(model, (ids.to(device), targets.to(device)), reference,
                                     config.beta)
            for name, value in {"loss": float(out.loss), **preference_figures(out)}.items():
                sums[name] = sums.get(name, 0.0) + value * len(chunk)  # pair-weighted mean
    return {f"val_{name}": total / len(pairs) for name, total in sums.items()}


def finetune_dpo(config: DPOConfig) -> dict[str, Any]:
    """DPO of ``config.checkpoint`` on preference pairs; returns the final figures."""
    env = init_distributed(config.device)
    try:
        base = open_base(config, env)
        train_pairs, val_pairs, report = rendered_split(config, base, preference_rows,
                                                        render_pairs, "preference pairs")
        pad = pad_id_of(base.tokenizer)
        batches = PreferenceBatches(train_pairs, config.batch_size, base.seq_len, config.seed,
                                    pad, env.rank, env.world_size, env.device)
        reference = reference_for(base, config.reference == "adapters" or (
            config.reference == "auto" and base.lora is not None))
        optimizer = optimizer_for(base.model, config)
        autocast = autocast_for(config, env)

        def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]
                    ) -> tuple[Tensor, dict[str, float]]:
            out = dpo_batch_loss(model, batch, reference, config.beta)
            return out.loss, preference_figures(out)

        def evaluate(m: nn.Module) -> dict[str, float]:
            return held_out_preferences(m, val_pairs, reference, config, pad, env.device,
                                        autocast)

        info = run_info(config, base, "dpo", report)
        summary = fit(base.model, optimizer, batches, loss_fn, config, env, info,
                      batch_size=2 * config.batch_size, seq_len=base.seq_len,
                      evaluate=evaluate, count_tokens=lambda batch: count_tokens(batch, pad).real)
        return finish(base, config, env, summary, report)
    finally:
        shutdown_distributed(env)
