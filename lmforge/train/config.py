"""Training configs: ``LoopConfig`` (how the shared loop runs, for every objective) and
``TrainConfig`` (a pretraining run: the loop's fields plus data, model and batches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config import check_at_least, option
from lmforge.errors import ConfigError
from lmforge.model import PRESETS


@dataclass
class LoopConfig:
    """How the training loop runs: schedule, optimizer, precision, checkpoints, logging. Every
    training stage's config extends this one."""

    out: str = option("runs/train", "run directory: config, metrics, checkpoints, plots")
    max_steps: int = option(1000, "optimizer steps to train for")
    time_budget_minutes: float = option(0.0, "stop early (evaluate and save) once training has "
                                              "run this long (0: no limit)")
    lr: float = option(3e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "cosine decay floor, as a fraction of lr")
    warmup_steps: int = option(50, "linear warmup steps from 0 to lr")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (matrices only by default)")
    decay_embeddings: bool = option(False, "apply weight decay to embeddings too")
    beta1: float = option(0.9, "AdamW β1")
    beta2: float = option(0.95, "AdamW β2 (0.95: steadier than 0.999 for LM pretraining)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    dtype: Literal["auto", "fp32", "bf16"] = option(
        "auto", "compute dtype via autocast: auto = bf16 where the hardware has bf16 matmuls "
                "(CUDA; CPUs with AVX512-BF16/AMX), else fp32")
    compile: bool = option(False, "torch.compile the model")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    parallel: Literal["auto", "none", "ddp", "fsdp"] = option(
        "auto", "data parallelism under torchrun: auto = ddp when WORLD_SIZE > 1")
    seed: int = option(1337, "seed for initialization and data order")
    log_every: int = option(10, "steps between progress-bar/metrics updates of rolling figures")
    eval_every: int = option(100, "steps between validation runs (and samples)")
    save_every: int = option(100, "steps between checkpoints")
    keep_last: int = option(3, "checkpoints kept besides the best one")
    resume: bool = option(False, "continue the latest checkpoint in out/")
    spike: dict = option({}, "loss-spike detector overrides (see SpikeConfig), YAML")
    peak_flops: float = option(0.0, "accelerator peak FLOP/s for MFU (0: from the device, "
                                    "known for H100/H200/A100; none on CPU)")
    tensorboard: bool = option(False, "also write TensorBoard event files")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_at_least(self, 1, "grad_accum", "max_steps", "log_every", "eval_every",
                       "save_every", "keep_last")
        check_at_least(self, 0, "warmup_steps", "time_budget_minutes", "peak_flops")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: expected [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1/beta2: expected [0, 1), got {self.beta1}, {self.beta2}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")


@dataclass
class TrainConfig(LoopConfig):
    """A pretraining run. Model sizes come from ``preset`` (+ ``model`` overrides)."""

    data: str = option("", "prepared data directory (lmforge data prepare)")
    preset: str = option("tiny-cpu", f"model preset: {', '.join(PRESETS)}")
    model: dict = option({}, "model config overrides, e.g. {n_layers: 6} (YAML)")
    batch_size: int = option(16, "sequences per micro-batch (per rank)")
    seq_len: int = option(0, "tokens per sequence (0: the model's context)")
    loader_mode: Literal["random", "sequential"] = option("random", "training batch order")
    eval_batches: int = option(20, "validation batches per evaluation (fewer when the "
                                   "validation split is smaller)")
    sample_tokens: int = option(48, "tokens generated per sample at each evaluation (0: none)")
    sample_prompt: str = option("def ", "prompt of the samples")
    inject_spike_at: int = option(-1, "corrupt the training batches from this data step on, to "
                                      "demonstrate spike recovery (-1: never)")
    inject_spike_length: int = option(3, "how many consecutive batches the injection corrupts")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ConfigError("data: give the prepared data directory")
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: {self.preset!r} is not one of {', '.join(PRESETS)}")
        check_at_least(self, 1, "batch_size", "eval_batches", "inject_spike_length")
        check_at_least(self, 0, "seq_len", "sample_tokens")
