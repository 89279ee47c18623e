"""The fine-tuning methods by name, for the CLI: ``lmforge finetune METHOD``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.finetune.config import DPOConfig, FinetuneConfig, GRPOConfig, SFTConfig
from lmforge.finetune.dpo import finetune_dpo
from lmforge.finetune.grpo import finetune_grpo
from lmforge.finetune.sft import finetune_sft

METHODS: dict[str, tuple[type[FinetuneConfig], Callable[[Any], dict[str, Any]]]] = {
    "sft": (SFTConfig, finetune_sft),
    "dpo": (DPOConfig, finetune_dpo),
    "grpo": (GRPOConfig, finetune_grpo),
}
