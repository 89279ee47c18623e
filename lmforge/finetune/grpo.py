"""GRPO-style reinforcement learning with a verifiable reward (arXiv:2402.03300; as nanochat and
CS336 run it on GSM8K), on the shared training loop.

Each step: B questions from the training set → G replies each, sampled by the KV-cache engine
from the current policy → reward 1 where the reply's answer is right (the evaluation's GSM8K
extractor), else 0 → advantage = reward − its group's mean (optionally ÷ the group's std) →
token-level policy-gradient loss on the sampled tokens, plus an optional KL term to the base.

    lmforge finetune grpo --checkpoint SFT_RUN --data gsm8k/train.jsonl --out runs/grpo
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.data.chat_batches import Example, pad_id_of, pad_rows
from lmforge.data.conversations import Conversation
from lmforge.errors import InputError
from lmforge.eval.gsm8k import answer_is_right
from lmforge.finetune.config import GRPOConfig
from lmforge.finetune.objectives import group_advantages, policy_gradient_loss, token_logprobs
from lmforge.finetune.run import (
    conversation_rows,
    finish,
    open_base,
    read_split,
    reference_for,
    run_info,
)
from lmforge.inference import SamplingParams, generate_batch
from lmforge.tokenizer import ENDOFTEXT, Tokenizer
from lmforge.tokenizer.chat import END, render_chat
from lmforge.train.distributed import init_distributed, shutdown_distributed, unwrap
from lmforge.train.loop import fit, optimizer_for

log = logging.getLogger(__name__)

Question = tuple[list[int], str]  # (prompt ids ending at the assistant's turn, gold answer)


def questions_of(tokenizer: Tokenizer, rows: list[Conversation], context: int,
                 room: int) -> list[Question]:
    """Each conversation's history before its last assistant turn as a prompt, and that turn
    as the gold answer; prompts that leave fewer than ``room`` tokens of context are skipped."""
    out = []
    for row in rows:
        prompt = render_chat(tokenizer, row[:-1])
        if len(prompt) + room <= context:
            out.append((prompt, row[-1].content))
    return out


class QuestionBatches:
    """B questions per step, each epoch a permutation seeded with (seed, epoch); batch k is a
    function of k alone (resume and rollback reproduce it), and so is its sampling seed."""

    def __init__(self, questions: list[Question], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.per_epoch = len(questions) // (batch_size * world_size)
        if self.per_epoch == 0:
            raise InputError(f"data: {len(questions)} questions do not fill one batch of "
                             f"{batch_size} × {world_size} rank(s)")
        self.questions, self.batch_size, self.seed = questions, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def next_batch(self) -> tuple[list[Question], int]:
        slot = self.step * self.world_size + self.rank
        epoch, index = divmod(self.step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.questions))
        first = (index * self.world_size + self.rank) * self.batch_size
        self.step += 1
        return ([self.questions[i] for i in order[first:first + self.batch_size]],
                self.seed * 1_000_003 + slot)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "questions": len(self.questions), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["questions"], state["seed"]) != (len(self.questions), self.seed):
            raise InputError("resume: the questions or the seed differ from the checkpoint's")
        self.step = state["step"]


def rollout_batch(prompts: list[list[int]], replies: list[list[int]], pad_id: int
                  ) -> tuple[Tensor, Tensor]:
    """(ids, targets) of prompt + reply rows, targets on every sampled token of the reply (the
    stop token that ended it included) and nowhere else."""
    rows = []
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = np.asarray(prompt + reply, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(prompt):] = True
        rows.append(Example(ids, mask, False))
    return pad_rows(rows, pad_id)


def finetune_grpo(config: GRPOConfig) -> dict[str, Any]:
    """GRPO of ``config.checkpoint`` on GSM8K-style questions; returns the final figures."""
    env = init_distributed(config.device)
    try:
        base = open_base(config, env)
        tok = base.tokenizer
        context = unwrap(base.model).config.context
        train_rows, val_rows, report = read_split(config, conversation_rows)
        train_q = questions_of(tok, train_rows, context, config.max_new_tokens)
        val_q = questions_of(tok, val_rows, context, config.max_new_tokens)
        if not train_q or not val_q:
            raise InputError(f"data: no question of {config.data} leaves room for "
                             f"{config.max_new_tokens} new tokens in the context of {context}")
        batches = QuestionBatches(train_q, config.batch_size, config.seed, env.rank,
                                  env.world_size)
        reference = (reference_for(base, base.lora is not None) if config.kl_coef > 0
                     else None)
        optimizer = optimizer_for(base.model, config)
        stop_ids = (tok.token_id(END), tok.token_id(ENDOFTEXT))
        pad, G = pad_id_of(tok), config.group_size
        params = SamplingParams(max_new_tokens=config.max_new_tokens,
                                temperature=config.temperature, top_k=config.top_k or None,
                                seed=config.seed)

        def loss_fn(model: nn.Module, batch: tuple[list[Question], int]
                    ) -> tuple[Tensor, dict[str, float]]:
            questions, sample_seed = batch
            prompts = [prompt for prompt, _ in questions for _ in range(G)]
            net = unwrap(model)
            generator = torch.Generator(env.device).manual_seed(sample_seed)
            # the engine's cache holds the weights' dtype: sample outside the loop's autocast
            with torch.autocast(env.device.type, enabled=False):
                replies = generate_batch(net, prompts, params, stop_ids=stop_ids,
                                         generator=generator, vocab_size=tok.vocab_size,
                                         include_stop=True)
            right = [answer_is_right(tok.decode(reply), gold)
                     for reply, (_, gold) in zip(replies, [q for q in questions for _ in range(G)],
                                                 strict=True)]
            rewards = torch.tensor(right, dtype=torch.float32, device=env.device)
            advantages = group_advantages(rewards, G, config.scale_by_std)
            ids, targets = rollout_batch(prompts, replies, pad)
            ids, targets = ids.to(env.device), targets.to(env.device)
            logprobs = token_logprobs(model, ids, targets)
            ref = reference(token_logprobs, ids, targets) if reference else None
            loss, figures = policy_gradient_loss(logprobs, advantages, targets != -100,
                                                 ref_logprobs=ref, kl_coef=config.kl_coef)
            return loss, {"reward": float(rewards.mean()),
                          "pass_rate": float(rewards.view(-1, G).amax(1).mean()),
                          "reply_tokens": float(np.mean([len(r) for r in replies])),
                          **{k: float(v) for k, v in figures.items()}}

        def evaluate(m: nn.Module) -> dict[str, float]:
            rate = pass_rate(unwrap(m), tok, val_q, config.max_new_tokens,
                             config.batch_size * G)
            # checkpoints are ranked by val_loss: here the held-out error rate
            return {"val_pass_rate": rate, "val_loss": 1.0 - rate}

        report = {**report, "train_questions": len(train_q), "val_questions": len(val_q)}
        info = run_info(config, base, "grpo", report)
        summary = fit(base.model, optimizer, batches, loss_fn, config, env, info,
                      batch_size=config.batch_size * G, seq_len=context, evaluate=evaluate)
        return finish(base, config, env, summary, report)
    finally:
        shutdown_distributed(env)


@torch.no_grad()
def pass_rate(model: nn.Module, tokenizer: Tokenizer, questions: list[Question],
              max_new_tokens: int, batch_size: int) -> float:
    """Share of ``questions`` whose greedy reply has the right answer."""
    stop_ids = (tokenizer.token_id(END), tokenizer.token_id(ENDOFTEXT))
    right = 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        replies = generate_batch(model, [p for p, _ in chunk],
                                 SamplingParams.greedy(max_new_tokens), stop_ids=stop_ids,
                                 vocab_size=tokenizer.vocab_size)
        right += sum(answer_is_right(tokenizer.decode(r), gold)
                     for r, (_, gold) in zip(replies, chunk, strict=True))
    return right / len(questions)
