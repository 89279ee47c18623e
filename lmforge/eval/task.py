"""What a task is: examples → requests to the model → per-example predictions → metrics.

Every example has an ``id`` (stable across runs), so a run can be resumed: predictions already in
the partial file are not recomputed. Tasks share the model through :class:`Env`: the loaded
model, its tokenizer, and the batched scorer and generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from torch import nn

from lmforge.eval.scoring import Score, score_requests
from lmforge.inference import SamplingParams, generate_batch
from lmforge.inference.engine import MIN_SHARED_PREFIX, common_prefix
from lmforge.tokenizer import ENDOFTEXT, Tokenizer

Example = dict[str, Any]
Prediction = dict[str, Any]


@dataclass
class Env:
    """The model a task runs on, and how big its batches are."""

    model: nn.Module
    tokenizer: Tokenizer
    batch_size: int = 16
    progress: Callable[[int], None] | None = None  # called with how many requests finished

    def score(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        return score_requests(self.model, requests, self.batch_size, self.progress)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) pair as lm-evaluation-harness makes them:
        whitespace at the end of the context moves to the continuation, and the continuation's
        ids are those of the whole text after the context's (so a merge across the boundary is
        the one the model would see)."""
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        whole = self.tokenizer.encode(stripped + continuation)
        context_ids = self.tokenizer.encode(stripped)
        return context_ids, whole[len(context_ids):]

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 until: Sequence[str]) -> list[str]:
        """Texts generated after each prompt, ended at ``<|endoftext|>`` or the first ``until``
        string (not included). At most half the model's context goes to new tokens; prompts
        are cut from the left to leave room for them. ``batch_size`` prompts decode at once,
        longest first (as lm-eval orders them), each one that ends handing its place to the
        next (continuous batching). Prompts that share a prefix (few-shot examples, one
        prompt sampled n times), a batch of them or more, decode together apart from the rest,
        so that the engine keeps that prefix once for all of them; a prompt cut from the left
        has lost the examples the others start with and goes with the rest."""
        tok, context = self.tokenizer, self.model.config.context
        new = min(params.max_new_tokens, context // 2)
        params = replace(params, max_new_tokens=new)
        prompts = [p[-(context - new):] for p in prompts]
        stop_ids = [tok.special_tokens[s] for s in (ENDOFTEXT,) if s in tok.special_tokens]
        runs: list[list[int]] = []  # neighbours in length order that share a prefix
        for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
            if runs and common_prefix([prompts[runs[-1][0]], prompts[i]]) >= MIN_SHARED_PREFIX:
                runs[-1].append(i)
            else:
                runs.append([i])
        groups = [run for run in runs if len(run) >= self.batch_size]
        groups.append([i for run in runs if len(run) < self.batch_size for i in run])
        texts = [""] * len(prompts)

        def finished(i: int, ids: list[int]) -> bool:
            tail = tok.decode(ids[-32:])  # a stop string ends within the last tokens
            return any(u in tail for u in until)

        def ended(i: int) -> None:
            if self.progress:
                self.progress(1)

        for group in filter(None, groups):
            outs = generate_batch(self.model, [prompts[i] for i in group], params,
                                  stop_ids=stop_ids, vocab_size=tok.vocab_size,
                                  finished=finished, max_batch=self.batch_size,
                                  on_end=ended)
            for i, ids in zip(group, outs, strict=True):
                text = tok.decode(ids)
                cut_at = min((at for at in (text.find(u) for u in until) if at >= 0),
                             default=len(text))
                texts[i] = text[:cut_at]
        return texts


class Task(Protocol):
    """One benchmark: its examples, how to run a list of them, and its metrics."""

    name: str
    chance: float | None  # the score of guessing, shown next to the result

    def examples(self) -> list[Example]: ...

    def run(self, env: Env, examples: list[Example]) -> list[Prediction]: ...

    def metrics(self, predictions: list[Prediction]) -> dict[str, Any]: ...

    def settings(self) -> dict[str, Any]: ...
