"""The fine-tuning objectives as small pure functions: log-probabilities, DPO, GRPO.

Batches follow the SFT convention: ``ids`` and ``targets`` are int64 (B, T) with
``targets[:, t] = ids[:, t+1]`` on response tokens and ``-100`` elsewhere (prompt, padding), so
position t scores the token that follows it. Preference batches stack the B chosen rows on top of
the B rejected rows, (2B, T); ``logps.chunk(2)`` splits them back.

- DPO (Rafailov et al., arXiv:2305.18290, eq. 7): with log-ratios ρ = log π(y|x) − log π_ref(y|x),
  L = −log σ(β·(ρ_chosen − ρ_rejected)), averaged over pairs; β·ρ is the implicit reward.
- GRPO (Shao et al., arXiv:2402.03300, §4.1): G completions per prompt; a completion's advantage is
  its reward minus its group's mean, optionally divided by the group's std; the clipped PPO
  surrogate (arXiv:1707.06347) is applied per token with a k3 KL penalty toward the reference.

Nothing here owns a model, an optimizer or a loop: the trainer calls these on its batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import InputError
from lmforge.model import Transformer
from lmforge.train.distributed import unwrap

IGNORE_INDEX = -100  # target value of positions that are not scored (as in lm_loss, HF, TRL)

# Logits are upcast to float32 this many elements at a time (~64 MiB), so that a long batch with a
# large vocabulary never needs a second, fp32 copy of all its logits at once.
_CHUNK_ELEMENTS = 1 << 24

# ---------------------------------------------------------------------------------- log-probs


def token_logprobs(model: Callable[[Tensor], Tensor], ids: Tensor, targets: Tensor) -> Tensor:
    """log p(targets[b, t] | ids[b, :t+1]) for every position, (B, T) float32; 0 where the
    target is ``-100``.

    ``model(ids)`` must return next-token logits (B, T, V) — wrap a Hugging Face model as
    ``lambda x: hf(x).logits``; a :class:`lmforge.model.Transformer` (or its DDP wrapper) is
    asked for the scored positions' cross-entropy instead, so prompt and padding positions
    never go through the LM head. The log-softmax and gather are
    fused in ``F.cross_entropy(reduction="none")`` and run in float32 whatever the logits' dtype
    (bf16 log-probs summed over hundreds of tokens lose the small differences DPO feeds on).
    """
    if ids.dim() != 2 or ids.shape != targets.shape:
        raise InputError(f"ids and targets must both be (B, T); got {tuple(ids.shape)} and "
                         f"{tuple(targets.shape)}")
    if isinstance(unwrap(model), Transformer):  # only the scored positions reach the LM head
        return -model(ids, targets, reduction="none")
    logits = model(ids)  # (B, T, V)
    B, T, V = logits.shape
    rows = max(1, _CHUNK_ELEMENTS // (T * V))
    chunks = []
    for s in range(0, B, rows):
        nll = F.cross_entropy(logits[s : s + rows].flatten(0, 1).float(),
                              targets[s : s + rows].flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none")  # 0 at ignored positions
        chunks.append(-nll.view(-1, T))  # (rows, T)
    return torch.cat(chunks)


def sequence_logprobs(model: Callable[[Tensor], Tensor], ids: Tensor, targets: Tensor) -> Tensor:
    """log π(response | prompt) per row, (B,) float32: the sum of :func:`token_logprobs` over the
    scored positions. For one row, ``−model(ids, targets) · (number of scored targets)``."""
    return token_logprobs(model, ids, targets).sum(dim=-1)


# ---------------------------------------------------------------------------------------- DPO


@dataclass
class DPOOutput:
    """The DPO loss and its diagnostics; every field but ``loss`` is detached."""

    loss: Tensor  # scalar, mean over pairs of −log σ(β·((πc − rc) − (πr − rr)))
    chosen_rewards: Tensor  # (B,) implicit rewards β·(log π − log π_ref) of the chosen responses
    rejected_rewards: Tensor  # (B,) the same for the rejected responses
    margin: Tensor  # scalar, mean of chosen_rewards − rejected_rewards
    accuracy: Tensor  # scalar, share of pairs whose chosen reward exceeds the rejected one


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float = 0.1) -> DPOOutput:
    """The DPO sigmoid loss (arXiv:2305.18290, eq. 7) from sequence log-probs, each (B,).

    L = mean_b −log σ(β·((πc − rc) − (πr − rr))), with ``F.logsigmoid`` so that large margins of
    either sign neither overflow nor lose precision. β (the paper's KL weight, 0.1 as in the paper
    and TRL's default) sets how far the policy may drift from the reference: smaller β, further.
    """
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise InputError(f"dpo_loss: the four log-prob tensors must share one (B,) shape; got "
                         f"{sorted(shapes)}")
    if not beta > 0:
        raise InputError(f"dpo_loss: beta must be > 0, got {beta!r}")
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return DPOOutput(loss=loss, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                     margin=(chosen_rewards - rejected_rewards).mean(),
                     accuracy=(chosen_rewards > rejected_rewards).float().mean())


# --------------------------------------------------------------------------------------- GRPO


def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = False,
                     eps: float = 1e-4) -> Tensor:
    """Group-relative advantages (arXiv:2402.03300, §4.1.2), same shape as ``rewards``.

    ``rewards`` is (N·G,) with each prompt's G completions contiguous (``repeat_interleave``
    order). A = r − mean(group); with ``scale_by_std``, A / (std(group) + eps) using the unbiased
    (Bessel, G − 1) std, as TRL's GRPOTrainer does (``nanstd``, eps 1e-4, which keeps a group of
    equal rewards at exactly 0). Off by default: Dr. GRPO (arXiv:2503.20783) shows the division
    over-weights near-unanimous groups; TRL's ``scale_rewards="group"`` default turns it on.
    """
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise InputError(f"group_advantages: rewards must be (N·G,) with G = group_size = "
                         f"{group_size} ≥ 1; got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)  # (N, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:  # a group of one has advantage 0 and no std
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


def policy_gradient_loss(token_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                         old_logprobs: Tensor | None = None, clip_eps: float = 0.2,
                         ref_logprobs: Tensor | None = None, kl_coef: float = 0.0
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """The token-level GRPO/PPO surrogate loss and its diagnostics.

    ``token_logprobs`` (B, T): log π(o_t | q, o_<t) of the sampled tokens, with gradient;
    ``advantages`` (B,) per completion (broadcast over its tokens) or (B, T); ``mask`` (B, T):
    1 on completion tokens. Per token, with ratio = exp(logp − old_logp):

        ℓ_t = −min(ratio·A, clip(ratio, 1 − ε, 1 + ε)·A) + kl_coef · k3_t,
        k3_t = exp(ref − logp) − (ref − logp) − 1   (Schulman's unbiased, non-negative KL estimator)

    With ``old_logprobs=None`` the samples are on-policy: old = logp.detach(), ratio ≡ 1, no
    clipping, and the gradient is REINFORCE's −A·∇logp per token. Clipping applies only when
    ``old_logprobs`` is given (several updates per batch of samples).

    Aggregation is one mean over every unmasked token of the batch (DAPO's token-level loss,
    arXiv:2503.14476; TRL's ``bnpo``, and its ``dapo`` default on one process): each token weighs
    the same, so long completions are not down-weighted as in the GRPO paper's per-sequence mean.
    """
    if token_logprobs.dim() != 2 or mask.shape != token_logprobs.shape:
        raise InputError(f"policy_gradient_loss: token_logprobs and mask must both be (B, T); got "
                         f"{tuple(token_logprobs.shape)} and {tuple(mask.shape)}")
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1): one advantage for every token of a completion
    if kl_coef and ref_logprobs is None:
        raise InputError("policy_gradient_loss: kl_coef > 0 needs ref_logprobs")
    mask = mask.to(token_logprobs.dtype)
    n_tokens = mask.sum().clamp(min=1)

    def token_mean(x: Tensor) -> Tensor:
        return (x * mask).sum() / n_tokens

    old = token_logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(token_logprobs - old)  # (B, T)
    per_token = -ratio * advantages
    metrics: dict[str, Tensor] = {}
    if old_logprobs is not None:
        clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
        per_token = torch.maximum(per_token, -clipped * advantages)  # −min(ratio·A, clip·A)
        was_clipped = ((ratio < 1 - clip_eps) & (advantages < 0)) | (
            (ratio > 1 + clip_eps) & (advantages > 0))
        metrics["clip_fraction"] = token_mean(was_clipped.to(mask.dtype)).detach()
    metrics["policy_loss"] = token_mean(per_token).detach()
    if ref_logprobs is not None:
        log_ref_ratio = ref_logprobs - token_logprobs
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # (B, T), ≥ 0
        metrics["kl"] = token_mean(kl).detach()
        if kl_coef:
            per_token = per_token + kl_coef * kl
    return token_mean(per_token), metrics
