"""The spike detector's decisions on hand-made loss/grad-norm sequences."""

from __future__ import annotations

import pytest

from lmforge.errors import ConfigError
from lmforge.train.spikes import SpikeConfig, SpikeDetector


def detector(**kw) -> SpikeDetector:
    d = SpikeDetector(SpikeConfig(**{"window": 20, "min_history": 10, **kw}))
    for i in range(20):  # a healthy, slightly noisy history around loss 3, grad norm 1
        assert d.check(3.0 + 0.01 * (i % 3), 1.0 + 0.05 * (i % 2)) == "ok"
    return d


def test_transient_spike_is_skipped_then_training_goes_on():
    d = detector()
    assert d.check(9.0, 1.0) == "skip"
    assert not d.healthy
    assert d.check(3.01, 1.0) == "ok" and d.healthy


def test_sustained_spike_asks_for_rollback():
    d = detector(sustained=3)
    assert [d.check(9.0, 1.0) for _ in range(3)] == ["skip", "skip", "rollback"]


def test_non_finite_values_are_always_outliers():
    d = SpikeDetector(SpikeConfig())  # even with no history yet
    assert d.check(float("nan"), 1.0) == "skip"
    assert d.check(3.0, float("inf")) == "skip"


def test_gradient_norm_has_its_own_bar():
    d = detector(grad_z_threshold=12.0)
    assert d.check(3.0, 1.2) == "ok"  # 7 std above: an outlier for a loss, not for a norm
    assert d.check(3.0, 50.0) == "skip"
    assert detector(grad_z_threshold=0).check(3.0, 50.0) == "ok"


def test_no_verdict_before_enough_history():
    d = SpikeDetector(SpikeConfig(window=20, min_history=10))
    assert all(d.check(v, 1.0) == "ok" for v in (9.0, 3.0, 12.0))


def test_state_round_trip():
    d = detector(sustained=3)
    d.check(9.0, 1.0)
    e = SpikeDetector(d.config)
    e.load_state_dict(d.state_dict())
    assert e.state_dict() == d.state_dict()
    # the restored window and outlier count decide as the original would
    assert [e.check(9.0, 1.0) for _ in range(2)] == ["skip", "rollback"]


@pytest.mark.parametrize(("kw", "message"), [({"window": 0}, "spike.window"),
                                              ({"min_history": 60}, "cannot exceed"),
                                              ({"lr_factor": 2.0}, "lr_factor")])
def test_bad_spike_configs(kw, message):
    with pytest.raises(ConfigError, match=message):
        SpikeConfig(**kw)
