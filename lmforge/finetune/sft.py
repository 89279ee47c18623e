"""Supervised fine-tuning: conversations in the chat format, next-token loss on the assistant's
tokens only (system and user turns are context), on the shared training loop.

    lmforge finetune sft --checkpoint BASE --data chats.jsonl --out runs/sft [--lora-rank 8]
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.data.chat_batches import (
    IGNORE,
    Example,
    SFTBatches,
    count_tokens,
    pad_id_of,
    pad_rows,
    render_examples,
)
from lmforge.evaluating import evaluating
from lmforge.finetune.config import SFTConfig
from lmforge.finetune.run import (
    conversation_rows,
    finish,
    open_base,
    rendered_split,
    run_info,
)
from lmforge.inference import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import END, Message, render_chat
from lmforge.train.distributed import init_distributed, shutdown_distributed
from lmforge.train.loop import autocast_for, fit, optimizer_for
from lmforge.train.sampling import forward_sample

log = logging.getLogger(__name__)


def assistant_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of the assistant's tokens (targets -100 elsewhere are ignored)."""
    ids, targets = batch
    return model(ids, targets)


@torch.no_grad()
def held_out_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
                  device: torch.device, autocast: AbstractContextManager) -> float:
    """Mean assistant-token cross-entropy over ``examples``, every target token weighted
    equally."""
    total = count = 0.0
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            ids, targets = pad_rows(examples[start:start + batch_size], pad_id)
            n = int((targets != IGNORE).sum())
            with autocast:
                loss = model(ids.to(device), targets.to(device))
            total += float(loss) * n
            count += n
    return total / max(count, 1)


def chat_reply(model: nn.Module, tokenizer: Tokenizer, user: str, params: SamplingParams) -> str:
    """The model's reply to one user message (ended by ``<|end|>`` or the token limit)."""
    prompt = render_chat(tokenizer, [Message("user", user)])
    end = tokenizer.token_id(END)
    return tokenizer.decode(forward_sample(model, prompt, params, (end,), tokenizer.vocab_size))


def finetune_sft(config: SFTConfig) -> dict[str, Any]:
    """Fine-tune ``config.checkpoint`` on conversations; returns the final figures."""
    env = init_distributed(config.device)
    try:
        base = open_base(config, env)
        tok = base.tokenizer
        train_examples, val_examples, report = rendered_split(
            config, base, conversation_rows, render_examples, "conversations")
        pad = pad_id_of(tok)
        batches = SFTBatches(train_examples, config.batch_size, base.seq_len, config.seed, pad,
                             env.rank, env.world_size, env.device)
        optimizer = optimizer_for(base.model, config)
        autocast = autocast_for(config, env)

        def evaluate(m: nn.Module) -> dict[str, float]:
            return {"val_loss": held_out_loss(m, val_examples, config.batch_size, pad,
                                              env.device, autocast)}

        def sample(m: nn.Module, step: int) -> str:
            params = SamplingParams(max_new_tokens=config.sample_tokens, seed=config.seed + step)
            return f"user: {config.sample_prompt}\nassistant: " + chat_reply(
                m, tok, config.sample_prompt, params)

        info = run_info(config, base, "sft", report)
        summary = fit(base.model, optimizer, batches, assistant_loss, config, env, info,
                      batch_size=config.batch_size, seq_len=base.seq_len, evaluate=evaluate,
                      sample=sample if config.sample_prompt and config.sample_tokens else None,
                      count_tokens=lambda batch: count_tokens(batch, pad).real)
        return finish(base, config, env, summary, report)
    finally:
        shutdown_distributed(env)

