"""Where a run directory keeps its things: one small object instead of path arithmetic.

A run directory is what ``lmforge train`` (and every later training stage) writes::

    RUN/config.json              the resolved configs (``train``, ``model``)
    RUN/tokenizer.lmforge.json   the run's copy of its tokenizer
    RUN/checkpoints/             step_NNNNNNN.pt files and their index.json
    RUN/metrics.jsonl            one JSON record per step / evaluation / event
    RUN/samples.txt, loss.png    samples at each evaluation, the loss curve
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.lmforge.json"


@dataclass(frozen=True)
class RunDir:
    """The layout of one run directory (nothing is created or read on construction)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run a checkpoint file ``RUN/checkpoints/step_N.pt`` belongs to."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples.txt"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    def exists(self) -> bool:
        """Whether ``path`` looks like a run directory (checkpoints or its tokenizer copy)."""
        return self.checkpoints.is_dir() or self.tokenizer.is_file()

    def recorded_config(self) -> dict[str, Any]:
        """``config.json`` as written by the run ({} when missing or unreadable)."""
        try:
            data = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def data_dir(self) -> str | None:
        """The prepared data directory the run trained on, as recorded (None if not). A
        fine-tuning run trained on conversations: its base run's (pretraining) data."""
        train = self.recorded_config().get("train")
        if not isinstance(train, dict):
            return None
        if train.get("method"):  # lmforge finetune: follow the base model back to its run
            base = train.get("base") or {}
            if base.get("kind") not in ("run", "checkpoint"):
                return None
            return RunDir.of_checkpoint(base["source"]).data_dir()
        data = train.get("data")
        return data if isinstance(data, str) and data else None
