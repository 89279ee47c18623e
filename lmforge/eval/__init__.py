"""Evaluation: bits per byte, MMLU, GSM8K and HumanEval (in a sandbox), lm-evaluation-harness.

One small class per task (examples → prompt → score) over one log-likelihood scorer and the
batched engine; :func:`evaluate` runs a list of them and writes ``eval.json``.
"""

from lmforge.eval.run import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
