"""Loss-spike detection: decide, before each optimizer step, whether to take it.

The decision rests on the loss. Over a rolling window of healthy steps the detector keeps the
loss's recent *level* (the mean of the last few healthy losses) and its *noise*
(std(successive differences)/√2: for i.i.d. noise that is its standard deviation, and unlike the
plain std it is not inflated by the falling trend of early training, where a spike is still a
spike). It keeps the same two figures for the gradient norm. A step is an *outlier* when

* its loss or gradient norm is NaN/Inf;
* its loss lies more than ``z_threshold`` noise units above the level; or
* its loss lies more than ``corroborated_fraction`` × ``z_threshold`` noise units above the
  level (a lower bar) *and* its gradient norm more than ``grad_z_threshold`` noise units above
  its own level.

The gradient norm alone never makes an outlier. On healthy runs it jumps by several × with the
loss flat (0.5 → 2.5 on a tiny model as the learning rate reaches its peak), and gradient clipping
already bounds the update such a step makes; it only corroborates a loss that is already high.
PaLM likewise acts on *loss* spikes (arXiv:2204.02311, §5.1: restart ~100 steps before the spike
and skip ~200–500 data batches). OLMo-core's ``SkipStepOptimizer`` skips a step whose loss *or*
gradient norm is more than 6 std above the mean of the last 128 steps; taking the gradient norm
alone as a reason is what made this detector skip healthy steps
(``benchmarks/spike_bench.py`` replays both rules on clean runs).

The defaults are measured (benchmarks/RESULTS.md, issue 10): on ≈1,900 healthy ``tiny-cpu``
steps over both built-in corpora the loss rose at most 4.7 noise units above its level, batches of
random tokens 16–41, and ``z_threshold`` 7 sits between. The gradient norm went up to 210 units
on healthy steps, but never past 3.4 on the ones whose loss was more than 3.5 up (the
corroborated bar, 0.5 × 7), hence ``grad_z_threshold`` 6.

One outlier (a transient) skips its optimizer step; ``sustained`` outliers in a row ask the loop
to roll back to the latest clean checkpoint (one saved while the window had no outlier), skip the
data that followed it and lower the learning rate for a while. After ``max_rollbacks`` the run
stops with a message instead of looping.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.config import check_at_least, option
from lmforge.errors import ConfigError

Verdict = Literal["ok", "skip", "rollback"]
_RECENT = 5  # healthy values averaged for the recent level


@dataclass
class SpikeConfig:
    """Thresholds of the loss-spike detector (defaults measured by benchmarks/spike_bench.py)."""

    enabled: bool = option(True, "watch for spikes at all")
    window: int = option(50, "healthy steps the noise is estimated over")
    min_history: int = option(20, "healthy steps needed before any verdict but NaN/Inf")
    z_threshold: float = option(7.0, "a loss this many noise units above its level is an outlier")
    corroborated_fraction: float = option(
        0.5, "this fraction of z_threshold is the loss's bar when the gradient norm corroborates")
    grad_z_threshold: float = option(
        6.0, "the gradient norm's bar to corroborate a moderately high loss (0: ignore it)")
    sustained: int = option(3, "consecutive outliers that trigger a rollback")
    max_rollbacks: int = option(3, "rollbacks allowed before the run gives up")
    lr_factor: float = option(0.5, "learning-rate multiplier after a rollback")
    cooldown_steps: int = option(100, "steps the lowered learning rate lasts")

    def __post_init__(self) -> None:
        if self.min_history < 3:
            raise ConfigError("spike.min_history: needs at least 3 values to estimate noise")
        check_at_least(self, 1, "window", "sustained", prefix="spike.")
        if self.min_history > self.window:
            raise ConfigError("spike.min_history: cannot exceed spike.window")
        if not self.z_threshold > 0:
            raise ConfigError(f"spike.z_threshold: must be > 0, got {self.z_threshold}")
        if not 0 < self.corroborated_fraction <= 1:
            raise ConfigError("spike.corroborated_fraction: must be in (0, 1], got "
                              f"{self.corroborated_fraction}")
        if self.grad_z_threshold < 0:
            raise ConfigError(f"spike.grad_z_threshold: must be >= 0, got {self.grad_z_threshold}")
        if not 0 < self.lr_factor <= 1:
            raise ConfigError(f"spike.lr_factor: must be in (0, 1], got {self.lr_factor}")


def excess(value: float, history: deque[float]) -> float:
    """How many noise units ``value`` lies above the recent level of ``history`` (≥ 3 values)."""
    values = list(history)
    diffs = [b - a for a, b in itertools.pairwise(values)]
    mean_diff = sum(diffs) / len(diffs)
    noise = math.sqrt(sum((d - mean_diff) ** 2 for d in diffs) / len(diffs) / 2)
    recent = values[-_RECENT:]
    level = sum(recent) / len(recent)
    return (value - level) / max(noise, 1e-3 * abs(level), 1e-8)


class SpikeDetector:
    def __init__(self, config: SpikeConfig) -> None:
        self.config = config
        self.losses: deque[float] = deque(maxlen=config.window)
        self.norms: deque[float] = deque(maxlen=config.window)
        self.consecutive = 0

    def outlier(self, loss: float, grad_norm: float) -> bool:
        """The rule of the module docstring, against the healthy history so far."""
        cfg = self.config
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return True
        if len(self.losses) < cfg.min_history:
            return False
        z = excess(loss, self.losses)
        if z > cfg.z_threshold:
            return True
        return (cfg.grad_z_threshold > 0 and z > cfg.corroborated_fraction * cfg.z_threshold
                and excess(grad_norm, self.norms) > cfg.grad_z_threshold)

    def check(self, loss: float, grad_norm: float) -> Verdict:
        if not self.config.enabled:
            return "ok"
        if self.outlier(loss, grad_norm):
            self.consecutive += 1
            return "rollback" if self.consecutive >= self.config.sustained else "skip"
        self.consecutive = 0
        self.losses.append(loss)
        self.norms.append(grad_norm)
        return "ok"

    @property
    def healthy(self) -> bool:
        """No outlier pending and enough history: a checkpoint saved now is *clean*."""
        return self.consecutive == 0 and len(self.losses) >= self.config.min_history

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms),
                "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(state["losses"], maxlen=self.config.window)
        self.norms = deque(state["norms"], maxlen=self.config.window)
        self.consecutive = state["consecutive"]
