"""GSM8K (Cobbe et al., arXiv:2110.14168) as lm-evaluation-harness's ``gsm8k`` task.

Prompt, exactly: ``k`` train examples ``"Question: {q}\\nAnswer: {answer}"`` each followed by a
blank line, then ``"Question: {q}\\nAnswer:"``. Greedy generation until ``Question:``, ``</s>``,
``<|im_end|>`` or the end-of-text token. Two answers are extracted: ``strict-match`` (the first
``#### (\\-?[0-9\\.\\,]+)``) and ``flexible-extract`` (the last number-like match of
``(-?[$0-9.,]{2,})|(-?[0-9]+)``); each is an exact match of the reference after lower-casing and
removing commas, ``$``, everything up to ``#### `` and a trailing period.

Few-shot examples as lm-eval draws them (``sampler="random"``: for each test question in order,
``random.Random(1234).sample(train, k)`` from one generator), or the first ``k`` of train
(``"first"``). They always come from train; the questions from test.

``chat``: the question as a user turn of the chat template (examples as earlier turns), the
answer generated after the assistant marker, ending at the end-of-turn marker.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.eval.data import gsm8k
from lmforge.eval.task import Env, Example, Prediction
from lmforge.inference import SamplingParams
from lmforge.tokenizer import Message, render_chat

UNTIL = ("Question:", "</s>", "<|im_end|>")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]
INVALID = "[invalid]"


def normalize(text: str) -> str:
    """lm-eval's exact-match preprocessing for gsm8k."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def strict_answer(text: str) -> str:
    match = STRICT.search(text)
    return match.group(1).strip() if match else INVALID


def flexible_answer(text: str) -> str:
    matches = FLEXIBLE.findall(text)
    if not matches:
        return INVALID
    return next(g for g in matches[-1] if g).strip()


def answer_is_right(text: str, answer: str) -> bool:
    """Whether ``text`` gives the number ``answer`` (a GSM8K solution ending "#### N", or N):
    its "#### N" when it has one, else its last number (the reward of RL fine-tuning)."""
    given = strict_answer(text)
    if given == INVALID:
        given = flexible_answer(text)
    return given != INVALID and normalize(given) == normalize(answer)


def question_text(row: dict[str, Any]) -> str:
    return f"Question: {row['question']}\nAnswer:"


@dataclass
class GSM8K:
    """GSM8K test questions with ``shots`` train examples each."""

    source: str
    shots: int = 5
    sampler: Literal["random", "first"] = "random"
    chat: bool = False
    max_new_tokens: int = 256
    name: str = "gsm8k"
    chance: float | None = 0.0

    def settings(self) -> dict[str, Any]:
        return {"shots": self.shots, "split": "test", "fewshot_split": "train",
                "fewshot_sampler": self.sampler, "fewshot_seed": 1234, "chat": self.chat,
                "max_new_tokens": self.max_new_tokens, "until": list(UNTIL)}

    def examples(self) -> list[Example]:
        train = gsm8k(self.source, "train")
        rnd = random.Random(1234)
        out = []
        for i, row in enumerate(gsm8k(self.source, "test")):
            shots = (rnd.sample(train, self.shots) if self.sampler == "random"
                     else train[:self.shots]) if self.shots else []
            out.append({"id": str(i), "question": row["question"], "answer": row["answer"],
                        "shots": [(s["question"], s["answer"]) for s in shots]})
        return out

    def context(self, ex: Example) -> str:
        fewshot = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in ex["shots"])
        return fewshot + question_text(ex)

    def _prompt(self, env: Env, ex: Example) -> list[int]:
        if not self.chat:
            return env.tokenizer.encode(self.context(ex))
        turns = []
        for q, a in ex["shots"]:
            turns += [Message("user", f"Question: {q}"), Message("assistant", a)]
        return render_chat(env.tokenizer, [*turns, Message("user", f"Question: {ex['question']}")])

    def run(self, env: Env, examples: list[Example]) -> list[Prediction]:
        params = SamplingParams.greedy(self.max_new_tokens)
        until = (*UNTIL, "<|end|>") if self.chat else UNTIL  # a chat turn ends at <|end|>
        texts = env.generate([self._prompt(env, ex) for ex in examples], params, until)
        out = []
        for ex, text in zip(examples, texts, strict=True):
            strict, flexible, gold = strict_answer(text), flexible_answer(text), ex["answer"]
            out.append({"id": ex["id"], "generated": text, "strict": strict,
                        "flexible": flexible, "gold": normalize(gold),
                        "strict_correct": normalize(strict) == normalize(gold),
                        "flexible_correct": normalize(flexible) == normalize(gold)})
        return out

    def metrics(self, predictions: list[Prediction]) -> dict[str, Any]:
        n = max(len(predictions), 1)
        return {"exact_match_strict": sum(p["strict_correct"] for p in predictions) / n,
                "exact_match_flexible": sum(p["flexible_correct"] for p in predictions) / n,
                "n": len(predictions)}
