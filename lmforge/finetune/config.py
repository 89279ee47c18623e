"""Fine-tuning configs: ``FinetuneConfig`` (what every method shares: the base model, the data,
LoRA, and the training loop's fields with fine-tuning defaults) and one small config per method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config import check_at_least, option
from lmforge.errors import ConfigError
from lmforge.finetune.lora import PROJECTIONS, LoraConfig
from lmforge.train.config import LoopConfig


@dataclass
class FinetuneConfig(LoopConfig):
    """A fine-tuning run of ``checkpoint`` (anything ``lmforge.load`` opens) on ``data``."""

    checkpoint: str = option("", "base model: run directory, checkpoint, quantized file (LoRA "
                                 "only) or Hugging Face directory")
    data: str = option("", "JSONL file (.jsonl or .jsonl.gz) of conversations or preference "
                           "pairs; builtin:docs-chat / builtin:docs-prefs for the built-in sets")
    val_data: str = option("", "held-out file in the same format (default: a --val-fraction "
                               "of --data)")
    val_fraction: float = option(0.05, "share of --data held out when no --val-data is given")
    val_max: int = option(256, "held-out items evaluated at most")
    strict: bool = option(False, "stop at the first bad row instead of skipping and counting it")
    batch_size: int = option(8, "conversations (or pairs) per micro-batch")
    seq_len: int = option(0, "tokens per row at most (0: the model's context); longer "
                             "conversations are cut from the left")
    lora_rank: int = option(0, "LoRA rank (0: full fine-tuning of every weight)")
    lora_alpha: float = option(16.0, "LoRA scale numerator: the update is scaled alpha / rank")
    lora_dropout: float = option(0.0, "dropout on the LoRA input while training")
    lora_targets: list[str] = option(list(PROJECTIONS), "projections that get adapters")
    # the loop's fields, with fine-tuning defaults
    out: str = option("runs/finetune", "run directory: config, metrics, checkpoints, adapter")
    max_steps: int = option(200, "optimizer steps to train for")
    lr: float = option(1e-4, "peak learning rate (LoRA usually wants ~10× more)")
    min_lr_ratio: float = option(0.0, "cosine decay floor, as a fraction of lr")
    warmup_steps: int = option(10, "linear warmup steps from 0 to lr")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    eval_every: int = option(50, "steps between held-out evaluations (and samples)")
    save_every: int = option(50, "steps between checkpoints")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("checkpoint", "data"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: expected [0, 1), got {self.val_fraction}")
        check_at_least(self, 1, "batch_size", "val_max")
        check_at_least(self, 0, "seq_len", "lora_rank")
        if self.lora_rank:
            self.lora()  # reject bad LoRA settings now

    def lora(self) -> LoraConfig | None:
        """The LoRA settings, or None for full fine-tuning."""
        if not self.lora_rank:
            return None
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=tuple(self.lora_targets))


@dataclass
class SFTConfig(FinetuneConfig):
    """Supervised fine-tuning: next-token loss on the assistant's tokens only."""

    out: str = option("runs/sft", "run directory: config, metrics, checkpoints, adapter")
    sample_prompt: str = option("What does textwrap.dedent do?",
                                "a user message answered at each evaluation ('' : none)")
    sample_tokens: int = option(64, "tokens of each sample reply")


@dataclass
class DPOConfig(FinetuneConfig):
    """Direct preference optimization (arXiv:2305.18290) on chosen/rejected pairs."""

    out: str = option("runs/dpo", "run directory: config, metrics, checkpoints, adapter")
    beta: float = option(0.1, "DPO β: how far the policy may move from the reference")
    reference: Literal["auto", "copy", "adapters"] = option(
        "auto", "the reference model: a frozen copy, or (LoRA) the same model with its "
                "adapters off — no second copy in memory; auto = adapters with LoRA")
    lr: float = option(5e-6, "peak learning rate (DPO moves far with little; LoRA ~10× more)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if self.reference == "adapters" and not self.lora_rank:
            raise ConfigError("reference: 'adapters' needs LoRA (--lora-rank > 0)")


@dataclass
class GRPOConfig(FinetuneConfig):
    """Group-relative policy optimization (arXiv:2402.03300) with a verifiable reward: the
    GSM8K answer extracted from each sampled reply is right or not."""

    out: str = option("runs/grpo", "run directory: config, metrics, checkpoints, adapter")
    data: str = option("", "GSM8K-style JSONL (question, answer ending '#### N')")
    batch_size: int = option(4, "questions per micro-batch")
    group_size: int = option(8, "replies sampled per question (G)")
    max_new_tokens: int = option(192, "tokens per sampled reply at most")
    temperature: float = option(1.0, "sampling temperature of the replies")
    top_k: int = option(0, "sample among the top k tokens (0: all)")
    scale_by_std: bool = option(False, "divide advantages by the group's std (GRPO's paper); "
                                       "off by default as in Dr. GRPO (arXiv:2503.20783)")
    kl_coef: float = option(0.0, "weight of the KL penalty to the reference (0: none)")
    lr: float = option(1e-5, "peak learning rate")
    val_max: int = option(64, "held-out questions answered greedily at each evaluation")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, 2, "group_size")
        check_at_least(self, 1, "max_new_tokens")
        check_at_least(self, 0, "top_k", "kl_coef")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0 (GRPO samples), got "
                              f"{self.temperature}")
