"""MMLU (Hendrycks et al., arXiv:2009.03300) as lm-evaluation-harness's default ``mmlu`` task.

Prompt, exactly: the subject's description ``"The following are multiple choice questions (with
answers) about {subject}.\\n\\n"``, then ``shots`` examples from ``dev`` in file order, each
``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X``, joined and followed by a blank line,
then the question in the same form ending at ``Answer:``. The four continuations " A" … " D" are
scored by log-likelihood; the most likely is the prediction. Accuracy per subject, micro (every
question counts once: lm-eval's size-weighted group score) and macro (every subject once).

``chat``: for chat models, the same text as one user turn of the chat template, and the letters
scored right after the assistant marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.eval.data import LETTERS, mmlu
from lmforge.eval.task import Env, Example, Prediction
from lmforge.tokenizer import Message, render_chat


def description(subject: str) -> str:
    return ("The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n")


def question_text(row: dict[str, Any]) -> str:
    lines = [row["question"].strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"],
                                                               strict=True)]
    return "\n".join(lines) + "\nAnswer:"


@dataclass
class MMLU:
    """MMLU ``split`` (test by default) with ``shots`` dev examples per subject."""

    source: str
    shots: int = 5
    split: str = "test"
    chat: bool = False
    name: str = "mmlu"
    chance: float | None = 0.25

    def settings(self) -> dict[str, Any]:
        return {"shots": self.shots, "split": self.split, "fewshot_split": "dev",
                "fewshot_sampler": "first_n", "chat": self.chat}

    def examples(self) -> list[Example]:
        dev: dict[str, list[dict]] = {}
        for row in mmlu(self.source, "dev"):
            dev.setdefault(row["subject"], []).append(row)
        counts: dict[str, int] = {}
        out = []
        for row in mmlu(self.source, self.split):
            subject = row["subject"]
            n = counts[subject] = counts.get(subject, 0) + 1
            out.append({"id": f"{subject}/{n - 1}", **row,
                        "context": self.context(row, dev.get(subject, [])[:self.shots])})
        return out

    def context(self, row: dict[str, Any], shots: list[dict[str, Any]]) -> str:
        """The prompt before the answer letter (see the module docstring)."""
        fewshot = "".join(question_text(s) + " " + LETTERS[s["answer"]] + "\n\n" for s in shots)
        return description(row["subject"]) + fewshot + question_text(row)

    def run(self, env: Env, examples: list[Example]) -> list[Prediction]:
        requests = []
        for ex in examples:
            if self.chat:
                ids = render_chat(env.tokenizer, [Message("user", ex["context"])])
                requests += [(ids, env.tokenizer.encode(letter)) for letter in LETTERS]
            else:
                requests += [env.encode_pair(ex["context"], " " + letter) for letter in LETTERS]
        scores = []
        by_subject: dict[str, list[int]] = {}  # one shared prefix per subject
        for i, ex in enumerate(examples):
            by_subject.setdefault(ex["subject"], []).append(i)
        flat: dict[int, list] = {}
        for rows in by_subject.values():
            got = env.score([requests[4 * i + j] for i in rows for j in range(4)])
            for k, i in enumerate(rows):
                flat[i] = got[4 * k:4 * k + 4]
        for i, ex in enumerate(examples):
            logprobs = [s.logprob for s in flat[i]]
            pred = max(range(4), key=logprobs.__getitem__)
            scores.append({"id": ex["id"], "subject": ex["subject"], "gold": ex["answer"],
                           "logprobs": logprobs, "pred": pred, "correct": pred == ex["answer"]})
        return scores

    def metrics(self, predictions: list[Prediction]) -> dict[str, Any]:
        subjects: dict[str, list[bool]] = {}
        for p in predictions:
            subjects.setdefault(p["subject"], []).append(p["correct"])
        per = {s: sum(v) / len(v) for s, v in sorted(subjects.items())}
        n = sum(len(v) for v in subjects.values())
        return {"acc": sum(sum(v) for v in subjects.values()) / max(n, 1),
                "acc_macro": sum(per.values()) / max(len(per), 1), "n": n, "subjects": per}
