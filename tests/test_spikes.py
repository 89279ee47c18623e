"""The spike detector's decisions on hand-made loss/grad-norm sequences."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import ConfigError
from lmforge.train.spikes import SpikeConfig, SpikeDetector

# The history below: losses cycle 3.00, 3.01, 3.02 (noise unit 0.01; level, the mean of the last
# five, 3.008); grad norms alternate 1.00, 1.05 (noise unit ≈ 0.035, level 1.03).
CALM_LOSS, HIGH_LOSS, SPIKE_LOSS = 3.01, 3.05, 3.10  # ≈ 0.2, 4.3 and 9.3 noise units up:
# below both bars (by default 7, and 3.5 with a corroborating gradient norm), between, above


def detector(**kw) -> SpikeDetector:
    d = SpikeDetector(SpikeConfig(**{"window": 20, "min_history": 10, **kw}))
    for i in range(20):
        assert d.check(3.0 + 0.01 * (i % 3), 1.0 + 0.05 * (i % 2)) == "ok"
    return d


def test_transient_spike_is_skipped_then_training_goes_on():
    d = detector()
    assert d.check(SPIKE_LOSS, 1.0) == "skip"
    assert not d.healthy
    assert d.check(CALM_LOSS, 1.0) == "ok" and d.healthy


def test_a_loss_spike_is_caught_whatever_the_gradient_norm():
    for norm in (0.5, 1.0, 50.0):
        assert detector().check(SPIKE_LOSS, norm) == "skip"
    assert detector(grad_z_threshold=0).check(SPIKE_LOSS, 1.0) == "skip"


def test_sustained_spike_asks_for_rollback():
    d = detector(sustained=3)
    assert [d.check(SPIKE_LOSS, 1.0) for _ in range(3)] == ["skip", "skip", "rollback"]


def test_a_gradient_norm_jump_with_a_flat_loss_is_healthy():
    d = detector()
    # 0.5 → 2.5 at the LR peak on a real run; 50 is ≈ 1400 noise units: clipping's business
    assert [d.check(CALM_LOSS, norm) for norm in (2.5, 50.0, 50.0, 50.0)] == ["ok"] * 4
    assert d.healthy


def test_a_moderately_high_loss_counts_only_with_a_gradient_norm_jump():
    assert detector().check(HIGH_LOSS, 1.0) == "ok"  # above the lower bar, not the full one
    assert detector().check(HIGH_LOSS, 50.0) == "skip"  # corroborated
    assert detector(corroborated_fraction=0.8).check(HIGH_LOSS, 50.0) == "ok"
    assert detector(grad_z_threshold=0).check(HIGH_LOSS, 50.0) == "ok"  # norm ignored


def test_non_finite_values_are_always_outliers():
    d = SpikeDetector(SpikeConfig())  # even with no history yet
    assert d.check(float("nan"), 1.0) == "skip"
    assert d.check(3.0, float("inf")) == "skip"
    assert d.check(float("inf"), float("nan")) == "rollback"  # the third in a row
    assert detector(grad_z_threshold=0).check(CALM_LOSS, float("nan")) == "skip"


def test_no_verdict_before_enough_history():
    d = SpikeDetector(SpikeConfig(window=20, min_history=10))
    assert all(d.check(v, 1.0) == "ok" for v in (9.0, 3.0, 12.0))


def test_disabled_detector_passes_everything():
    assert detector(enabled=False).check(float("nan"), 50.0) == "ok"


def test_state_round_trip():
    d = detector(sustained=3)
    d.check(SPIKE_LOSS, 1.0)
    state = json.loads(json.dumps(d.state_dict()))  # plain lists and numbers only
    assert state == d.state_dict()
    e = SpikeDetector(d.config)
    e.load_state_dict(state)
    assert e.state_dict() == d.state_dict()
    # the restored window and outlier count decide as the original would
    # (the second outlier is corroborated by the restored gradient-norm history)
    assert [e.check(HIGH_LOSS, 50.0), e.check(SPIKE_LOSS, 1.0)] == ["skip", "rollback"]


@pytest.mark.parametrize(("kw", "message"), [
    ({"window": 0}, "spike.window"),
    ({"min_history": 60}, "cannot exceed"),
    ({"min_history": 2}, "spike.min_history"),
    ({"z_threshold": 0}, "spike.z_threshold"),
    ({"corroborated_fraction": 1.5}, "spike.corroborated_fraction"),
    ({"grad_z_threshold": -1}, "spike.grad_z_threshold"),
    ({"lr_factor": 2.0}, "spike.lr_factor"),
])
def test_bad_spike_configs(kw, message):
    with pytest.raises(ConfigError, match=message):
        SpikeConfig(**kw)
