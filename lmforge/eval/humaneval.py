"""HumanEval (Chen et al., arXiv:2107.03374): complete each function, run its tests in the
sandbox (:mod:`lmforge.eval.sandbox`), report pass@k.

0-shot: the prompt is the problem's ``prompt`` as published; generation stops at the first
``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif`` or ``\\nprint`` (the paper's stop sequences) or
the end-of-text token. ``samples`` completions per problem — greedy when 1, else sampled at
``temperature`` — and the unbiased estimator pass@k = 1 − C(n−c, k) / C(n, k) (the paper's
numerically stable product form) for each k ≤ n among 1, 10, 100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.eval.data import humaneval
from lmforge.eval.sandbox import SandboxConfig, check_completion
from lmforge.eval.task import Env, Example, Prediction
from lmforge.inference import SamplingParams

UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: 1 − C(n−c,k)/C(n,k), as
    1 − Π_{i=n−c+1}^{n} (1 − k/i) (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class HumanEval:
    """The 164 HumanEval problems, ``samples`` completions each."""

    source: str
    samples: int = 1
    temperature: float = 0.8
    max_new_tokens: int = 512
    seed: int = 0
    sandbox: SandboxConfig | None = None
    name: str = "humaneval"
    chance: float | None = 0.0

    def settings(self) -> dict[str, Any]:
        return {"samples": self.samples, "temperature": self.temperature if self.samples > 1
                else 0.0, "max_new_tokens": self.max_new_tokens, "until": list(UNTIL),
                "seed": self.seed}

    def examples(self) -> list[Example]:
        return [{"id": row["task_id"], **row} for row in humaneval(self.source)]

    def run(self, env: Env, examples: list[Example]) -> list[Prediction]:
        if self.samples == 1:
            params = SamplingParams.greedy(self.max_new_tokens)
        else:
            params = SamplingParams(max_new_tokens=self.max_new_tokens,
                                    temperature=self.temperature, top_k=None, top_p=0.95,
                                    seed=self.seed)
        prompts = [env.tokenizer.encode(ex["prompt"]) for ex in examples
                   for _ in range(self.samples)]
        texts = env.generate(prompts, params, UNTIL)
        sandbox = self.sandbox or SandboxConfig()
        out = []
        for i, ex in enumerate(examples):
            completions = texts[i * self.samples:(i + 1) * self.samples]
            results = [check_completion(ex["prompt"], c, ex["test"], ex["entry_point"], sandbox)
                       for c in completions]
            out.append({"id": ex["id"], "completions": completions,
                        "results": [r.status for r in results],
                        "passed": sum(r.status == "passed" for r in results)})
        return out

    def metrics(self, predictions: list[Prediction]) -> dict[str, Any]:
        n = self.samples
        return {**{f"pass@{k}": float(np.mean([pass_at_k(n, p["passed"], k)
                                               for p in predictions]))
                   for k in KS if k <= n and predictions},
                "n": len(predictions)}
