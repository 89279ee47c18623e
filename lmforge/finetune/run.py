"""What every fine-tuning method shares around :func:`lmforge.train.loop.fit`: opening the base
model (LoRA applied or every weight trainable), reading and splitting the data, the run's record
(which names its base model, method and LoRA settings, so ``lmforge.load`` rebuilds it), and the
adapter file written at the end of a LoRA run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.config import to_dict
from lmforge.data.chat_builtin import docs_conversations, docs_preferences
from lmforge.data.conversations import (
    Conversation,
    PreferencePair,
    Skipped,
    read_conversations,
    read_preferences,
)
from lmforge.errors import ConfigError, InputError
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.lora import LoraConfig, adapters_disabled, apply_lora, save_adapter
from lmforge.loading import Loaded, open_model
from lmforge.rundir import RunDir
from lmforge.train.distributed import DistEnv, unwrap
from lmforge.train.loop import RunInfo, place

log = logging.getLogger(__name__)

T = TypeVar("T")
ADAPTER_FILE = "adapter.safetensors"


@dataclass
class Base:
    """The model being fine-tuned (placed on the run's device), and where it came from."""

    model: nn.Module
    loaded: Loaded
    lora: LoraConfig | None
    seq_len: int

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


def open_base(config: FinetuneConfig, env: DistEnv) -> Base:
    """The base model of ``config``, with LoRA adapters on it (``--lora-rank``) or every weight
    trainable, placed on the run's device."""
    loaded = open_model(config.checkpoint)
    model = loaded.model
    lora = config.lora()
    if loaded.quantization and lora is None:
        raise ConfigError(f"checkpoint: {loaded.source} holds {loaded.quantization} weights, "
                          "which cannot be trained; fine-tune it with LoRA (--lora-rank 8) or "
                          "fine-tune the float run")
    torch.manual_seed(config.seed)  # the adapters' initialization
    if lora is not None:
        names = apply_lora(model, lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA rank %d on %d projections: %s trainable parameters of %s",
                 lora.rank, len(names), f"{trainable:,}",
                 f"{sum(p.numel() for p in model.parameters()):,}")
    else:
        model.requires_grad_(True)
    seq_len = config.seq_len or model.config.context
    if seq_len > model.config.context:
        raise ConfigError(f"seq_len: {seq_len} exceeds the model's context "
                          f"{model.config.context}")
    return Base(place(model, config, env), loaded, lora, seq_len)


def split(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held-out): a seeded ``fraction`` of ``items`` held out, at least one of each
    when there are two or more."""
    if len(items) < 2:
        raise ConfigError(f"data: {len(items)} usable item(s); fine-tuning needs at least 2 "
                          "(one to train on, one held out)")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(order[:n_val].tolist())
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


def conversation_rows(path: str, strict: bool) -> tuple[list[Conversation], list[Skipped]]:
    """Conversations from a JSONL file, or ``builtin:docs-chat[:val]`` (the standard library's
    docstrings as questions and answers: :mod:`lmforge.data.chat_builtin`)."""
    if path.startswith("builtin:"):
        return _builtin(path, "docs-chat", docs_conversations), []
    return read_conversations(path, strict)


def preference_rows(path: str, strict: bool) -> tuple[list[PreferencePair], list[Skipped]]:
    """Preference pairs from a JSONL file, or ``builtin:docs-prefs[:val]`` (the right docstring
    summary against another function's)."""
    if path.startswith("builtin:"):
        return _builtin(path, "docs-prefs", docs_preferences), []
    return read_preferences(path, strict)


def _builtin(path: str, name: str, make: Callable[[Any], list[T]]) -> list[T]:
    given, _, part = path.removeprefix("builtin:").partition(":")
    if given != name or part not in ("", "val"):
        raise ConfigError(f"data: {path!r} is not a built-in set this method reads; use "
                          f"builtin:{name} (its held-out part: builtin:{name}:val)")
    return make(part or "train")


def read_split(config: FinetuneConfig, read: Callable[[str, bool], tuple[list[T], list[Skipped]]]
               ) -> tuple[list[T], list[T], dict[str, Any]]:
    """Train and held-out items of ``config.data`` (and ``config.val_data``) read with ``read``;
    bad rows are skipped and reported (``--strict``: the reader stops at the first). A built-in
    set is held out by its own split."""
    items, skipped = read(config.data, config.strict)
    if not items:
        why = f"; the first: {skipped[0]}" if skipped else ""
        raise InputError(f"{config.data}: no usable row ({len(skipped)} bad rows skipped{why})")
    val_data = config.val_data or (f"{config.data}:val" if config.data.startswith("builtin:")
                                   else "")
    if val_data:
        train_items = items
        val_items, val_skipped = read(val_data, config.strict)
        skipped += val_skipped
    else:
        train_items, val_items = split(items, config.val_fraction, config.seed)
    for s in skipped[:5]:
        log.warning("skipped %s", s)
    if len(skipped) > 5:
        log.warning("skipped %d more bad rows", len(skipped) - 5)
    val_items = val_items[:config.val_max]
    report = {"train_items": len(train_items), "val_items": len(val_items),
              "skipped_rows": len(skipped),
              "skipped": [str(s) for s in skipped[:100]]}
    return train_items, val_items, report


def rendered_split(config: FinetuneConfig, base: Base,
                   read: Callable[[str, bool], tuple[list[Any], list[Skipped]]],
                   render: Callable[[Any, list[Any], int], tuple[list[T], Any]], what: str
                   ) -> tuple[list[T], list[T], dict[str, Any]]:
    """Train and held-out items read (:func:`read_split`) and rendered for ``base`` (cut to its
    ``seq_len``), with a report of what was skipped, cut and dropped; refuses data with nothing
    left to learn (or to hold out)."""
    train_rows, val_rows, report = read_split(config, read)
    train, train_report = render(base.tokenizer, train_rows, base.seq_len)
    val, val_report = render(base.tokenizer, val_rows, base.seq_len)
    log.info("%s: train %s; held out %s", what, train_report, val_report)
    if not train or not val:
        raise InputError(f"data: nothing to learn from {config.data} after rendering (train: "
                         f"{train_report}; held out: {val_report}); check that the rows have "
                         "assistant replies and fit in --seq-len")
    return train, val, {**report, "train_rendered": vars(train_report),
                        "val_rendered": vars(val_report)}


def run_info(config: FinetuneConfig, base: Base, method: str, report: dict[str, Any]
             ) -> RunInfo:
    """The run's record: the config (paths resolved), the method, the base model, LoRA, and
    what was made of the data (``report``)."""
    loaded = base.loaded
    record = {**to_dict(config), "method": method,
              "checkpoint": str(Path(config.checkpoint).resolve()),
              "out": str(Path(config.out).resolve()),
              "base": {"source": str(loaded.source.resolve()), "kind": loaded.kind,
                       "quantization": loaded.quantization, "described": loaded.describe()},
              "lora": asdict(base.lora) if base.lora else None, "data_report": report}
    for name in ("data", "val_data"):
        value = getattr(config, name)
        if value and not value.startswith("builtin:"):
            record[name] = str(Path(value).resolve())
    return RunInfo(record, unwrap(base.model).config, loaded.tokenizer)


LogProbs = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model, ids, targets) → log-probs
Reference = Callable[[LogProbs, Tensor, Tensor], Tensor]  # the reference model's log-probs


def reference_for(base: Base, adapters_off: bool) -> Reference:
    """The reference model of DPO and of GRPO's KL term — the base as it was before training:
    with ``adapters_off`` (LoRA) the policy itself with its adapters switched off, so no
    second copy is held in memory; else a frozen copy taken now."""
    if adapters_off:
        if base.lora is None:
            raise ConfigError("reference: switching adapters off needs LoRA (--lora-rank > 0)")
        policy = base.model

        @torch.no_grad()
        def without_adapters(logprobs: LogProbs, ids: Tensor, targets: Tensor) -> Tensor:
            with adapters_disabled(policy):
                return logprobs(policy, ids, targets)

        return without_adapters
    frozen = copy.deepcopy(unwrap(base.model)).eval().requires_grad_(False)

    @torch.no_grad()
    def copied(logprobs: LogProbs, ids: Tensor, targets: Tensor) -> Tensor:
        return logprobs(frozen, ids, targets)

    return copied


def finish(base: Base, config: FinetuneConfig, env: DistEnv, summary: dict[str, Any],
           report: dict[str, Any]) -> dict[str, Any]:
    """After the loop: a LoRA run's adapters alone, as a small file in the run directory; the
    figures to return (the loop's summary, the data report, the adapter's path)."""
    out = {**summary, **report}
    if base.lora is not None and env.is_main:
        out["adapter"] = str(save_adapter(unwrap(base.model), base.lora,
                                          RunDir(config.out).path / ADAPTER_FILE))
    return out
