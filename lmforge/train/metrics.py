"""Run outputs: ``metrics.jsonl`` (one object per step or event), ``loss.png``, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.files import atomic_path
from lmforge.rundir import RunDir


class MetricsLog:
    """Appends JSON lines; step records carry ``step``, ``loss``, ``lr``, ``grad_norm``,
    ``tokens_per_s``; events carry ``event`` (``skip``, ``rollback``, ``eval``, …)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.path = RunDir(run_dir).metrics
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: needs the tensorboard package "
                                  "(pip install tensorboard)") from None
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: Path, baseline_bpb: float | None = None) -> Path | None:
    """``loss.png``: training loss and validation bpb (fine-tuning: held-out loss) against step,
    events marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(RunDir(run_dir).metrics)
    steps = [r for r in records if "loss" in r and "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    events = [r for r in records if r.get("event") in ("skip", "rollback")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    for r in events:
        ax1.axvline(r["step"], color="red" if r["event"] == "rollback" else "orange", lw=0.6)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("training loss (orange: skipped step, red: rollback)")
    # pretraining reports bits per byte; fine-tuning its held-out loss
    key = "val_bpb" if evals and all("val_bpb" in r for r in evals) else "val_loss"
    shown = [r for r in evals if key in r]
    ax2.plot([r["step"] for r in shown], [r[key] for r in shown], "o-", label="model")
    if baseline_bpb is not None:
        ax2.axhline(baseline_bpb, color="gray", ls="--", label="unigram baseline")
    ax2.set_xlabel("step")
    ax2.set_ylabel("bits per byte" if key == "val_bpb" else "held-out loss")
    ax2.set_title("validation")
    ax2.legend()
    fig.tight_layout()
    out = RunDir(run_dir).loss_plot
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
