"""Loss-spike detection: decide, before each optimizer step, whether to take it.

The detector keeps a rolling window of healthy steps' loss and gradient norm. A step is an
*outlier* when either is NaN/Inf, when the loss lies more than ``z_threshold`` noise units above
its recent level, or the gradient norm more than ``grad_z_threshold`` (gradient norms jump by
several × on ordinary batches, so their bar is higher). The recent level is the mean of the last
few healthy values and the noise unit is std(successive differences)/√2 over the window: for
i.i.d. noise that is its standard deviation, and unlike the plain std it is not inflated by a trend
(early in training the loss falls fast, and a spike there is still a spike).

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
    """Thresholds of the loss-spike detector."""

    enabled: bool = option(True, "watch for spikes at all")
    window: int = option(50, "healthy steps the mean and std are taken over")
    min_history: int = option(20, "healthy steps needed before z-scores are trusted")
    z_threshold: float = option(6.0, "a loss this many std above the window's mean is an outlier")
    grad_z_threshold: float = option(12.0, "the same for the gradient norm (0: ignore it)")
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
        if not self.z_threshold > 0 or self.grad_z_threshold < 0 or not 0 < self.lr_factor <= 1:
            raise ConfigError("spike: z_threshold must be > 0, grad_z_threshold >= 0 and "
                              "lr_factor in (0, 1]")


class SpikeDetector:
    def __init__(self, config: SpikeConfig) -> None:
        self.config = config
        self.losses: deque[float] = deque(maxlen=config.window)
        self.norms: deque[float] = deque(maxlen=config.window)
        self.consecutive = 0

    def _outlier(self, value: float, history: deque[float], z: float) -> bool:
        if not math.isfinite(value):
            return True
        if z == 0 or len(history) < self.config.min_history:
            return False
        values = list(history)
        diffs = [b - a for a, b in itertools.pairwise(values)]
        mean_diff = sum(diffs) / len(diffs)
        noise = math.sqrt(sum((d - mean_diff) ** 2 for d in diffs) / len(diffs) / 2)
        recent = values[-_RECENT:]
        level = sum(recent) / len(recent)
        return value > level + z * max(noise, 1e-3 * abs(level), 1e-8)

    def check(self, loss: float, grad_norm: float) -> Verdict:
        if not self.config.enabled:
            return "ok"
        cfg = self.config
        if (self._outlier(loss, self.losses, cfg.z_threshold)
                or self._outlier(grad_norm, self.norms, cfg.grad_z_threshold)):
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
