"""The offline fine-tuning chain a laptop can run: a pretrained base → SFT on the built-in
docstring conversations → DPO on the built-in preference pairs, with before/after figures on
held-out items (functions never trained on):

- the assistant-token loss of the held-out conversations, before and after SFT;
- the share of greedy replies that end with ``<|end|>`` within the token limit (a base model
  does not know that a turn ends);
- the preference accuracy: the share of held-out pairs whose chosen reply the model finds more
  likely than the rejected one (summed log-probs), before and after DPO.

``lmforge quickstart --chat`` runs it after pretraining.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge import load
from lmforge.data.chat_batches import (
    pad_id_of,
    pad_rows,
    pair_rows,
    render_examples,
    render_pairs,
)
from lmforge.data.chat_builtin import docs_conversations, docs_preferences
from lmforge.finetune.config import DPOConfig, SFTConfig
from lmforge.finetune.dpo import finetune_dpo
from lmforge.finetune.objectives import sequence_logprobs
from lmforge.finetune.sft import finetune_sft, held_out_loss
from lmforge.inference import SamplingParams, generate_batch
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import END, Message, render_chat

HELD_OUT = 128  # held-out conversations / pairs measured
REPLY_TOKENS = 48  # token limit of the measured replies


def ended_share(model: nn.Module, tokenizer: Tokenizer, questions: list[str],
                max_new_tokens: int = REPLY_TOKENS) -> tuple[float, list[str]]:
    """Share of greedy replies to ``questions`` that end with ``<|end|>`` within
    ``max_new_tokens``, and the replies."""
    end = tokenizer.token_id(END)
    prompts = [render_chat(tokenizer, [Message("user", q)]) for q in questions]
    replies = generate_batch(model, prompts, SamplingParams.greedy(max_new_tokens),
                             stop_ids=(end,), vocab_size=tokenizer.vocab_size)
    ended = sum(len(r) < max_new_tokens for r in replies)
    return ended / len(questions), [tokenizer.decode(r) for r in replies]


@torch.no_grad()
def preference_accuracy(model: nn.Module, tokenizer: Tokenizer, pairs: list,
                        batch_size: int = 16) -> float:
    """Share of rendered pairs whose chosen reply has the higher summed log-prob."""
    model.eval()
    pad, wins = pad_id_of(tokenizer), 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, targets = pad_rows(pair_rows(chunk), pad)
        logp = sequence_logprobs(model, ids, targets)
        wins += int((logp[:len(chunk)] > logp[len(chunk):]).sum())
    return wins / len(pairs)


def measure(path: str | Path) -> dict[str, Any]:
    """The chain's held-out figures of the model at ``path``."""
    model, tok = load(path)
    context = model.config.context
    conversations = docs_conversations("val")[:HELD_OUT]
    examples, _ = render_examples(tok, conversations, context)
    pairs, _ = render_pairs(tok, docs_preferences("val")[:HELD_OUT], context)
    share, replies = ended_share(model, tok, [c[0].content for c in conversations[:32]])
    return {"assistant_loss": held_out_loss(model, examples, 16, pad_id_of(tok),
                                            torch.device("cpu"), contextlib.nullcontext()),
            "ended_share": share,
            "preference_accuracy": preference_accuracy(model, tok, pairs),
            "replies": [{"user": c[0].content, "assistant": r}
                        for c, r in zip(conversations[:3], replies[:3], strict=True)]}


def chat_chain(base: str | Path, out: str | Path, minutes: float, progress: bool,
               steps: int = 300, say: Callable[[str], None] = print) -> dict[str, Any]:
    """SFT (``steps``) then DPO (``steps`` // 2) of ``base`` into ``out/sft`` and ``out/dpo``
    (each stage also bounded to ``minutes``; an existing stage is resumed), with the held-out
    figures of all three models."""
    out = Path(out)
    figures = {"base": measure(base)}
    say(f"      base: held-out assistant loss {figures['base']['assistant_loss']:.3f}, replies "
        f"ended {figures['base']['ended_share']:.0%}, preference accuracy "
        f"{figures['base']['preference_accuracy']:.0%}")
    sft_dir, dpo_dir = out / "sft", out / "dpo"
    say("      SFT on builtin:docs-chat (loss on the assistant's tokens only)")
    figures["sft_run"] = finetune_sft(SFTConfig(
        checkpoint=str(base), data="builtin:docs-chat", out=str(sft_dir), max_steps=steps,
        lr=1e-3, warmup_steps=steps // 15, batch_size=16, eval_every=max(1, steps // 3),
        save_every=max(1, steps // 3),
        time_budget_minutes=minutes, progress=progress,
        resume=(sft_dir / "checkpoints").is_dir()))
    figures["sft"] = measure(sft_dir)
    say(f"      after SFT: held-out assistant loss {figures['sft']['assistant_loss']:.3f}, "
        f"replies ended {figures['sft']['ended_share']:.0%}, preference accuracy "
        f"{figures['sft']['preference_accuracy']:.0%}")
    say("      DPO on builtin:docs-prefs (reference: the SFT model)")
    figures["dpo_run"] = finetune_dpo(DPOConfig(
        checkpoint=str(sft_dir), data="builtin:docs-prefs", out=str(dpo_dir),
        max_steps=max(1, steps // 2), lr=1e-4, warmup_steps=steps // 30, batch_size=8, beta=0.1,
        eval_every=max(1, steps // 6), save_every=max(1, steps // 6),
        val_max=128, time_budget_minutes=minutes, progress=progress,
        resume=(dpo_dir / "checkpoints").is_dir()))
    figures["dpo"] = measure(dpo_dir)
    say(f"      after DPO: preference accuracy {figures['dpo']['preference_accuracy']:.0%} "
        f"(implicit-reward accuracy {figures['dpo_run'].get('val_pref_accuracy', 0):.0%}), "
        f"held-out assistant loss {figures['dpo']['assistant_loss']:.3f}, replies ended "
        f"{figures['dpo']['ended_share']:.0%}")
    return figures
