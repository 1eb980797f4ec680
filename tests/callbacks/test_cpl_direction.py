"""CPLDirectionMonitor: one early warning when the pools push the CPL the wrong way, none otherwise."""

import logging
from types import SimpleNamespace

import pytest
import torch

from callbacks import CPLDirectionMonitor


def step(monitor, trainer, direction, d_plus, d_minus, perception=0.2):
    trainer.callback_metrics = {
        "train/cpl_direction": torch.tensor(direction),
        "train/divergence_preserving": torch.tensor(d_plus),
        "train/divergence_removing": torch.tensor(d_minus),
        "train/perception_fraction": torch.tensor(perception),
    }
    trainer.global_step += 1
    monitor.on_train_batch_end(trainer, None, None, None, 0)


def fake_trainer():
    return SimpleNamespace(callback_metrics={}, is_global_zero=True, global_step=0)


def test_warns_once_when_the_pools_push_the_wrong_way(caplog):
    monitor, trainer = CPLDirectionMonitor(window=3), fake_trainer()
    with caplog.at_level(logging.WARNING, logger="callbacks.cpl_direction"):
        step(monitor, trainer, 0.4, 0.011, 0.007)
        step(monitor, trainer, 0.0, 0.0, 0.0, perception=0.0)  # no perception tokens: not counted
        step(monitor, trainer, 0.3, 0.012, 0.008)
        assert not caplog.records and monitor.summary is None
        step(monitor, trainer, 0.2, 0.010, 0.006)
        # Mean over the three counted steps: direction (0.4 + 0.3 + 0.2) / 3 = 0.3, D+ 0.011, D- 0.007.
        assert monitor.summary == pytest.approx(
            {"steps": 3, "direction": 0.3, "d_plus": 0.011, "d_minus": 0.007, "warned": True}
        )
        for _ in range(5):  # once only
            step(monitor, trainer, 0.1, 0.02, 0.001)
    (record,) = caplog.records
    message = record.getMessage()
    assert "CPL direction 0.300, mean D+ 0.011, D- 0.007 over the first 3 steps" in message
    assert "up to step 4" in message and "cppo audit" in message
    assert "most perception tokens" in message and "on average" in message  # both reasons hold


def test_warns_when_ties_hide_a_larger_divergence_under_the_preserving_view(caplog):
    # The demo's case: most perception tokens tie (direction near 0.5), but D+ is larger on average.
    monitor, trainer = CPLDirectionMonitor(window=2), fake_trainer()
    with caplog.at_level(logging.WARNING, logger="callbacks.cpl_direction"):
        step(monitor, trainer, 0.52, 0.0009, 0.0001)
        step(monitor, trainer, 0.50, 0.0011, 0.0001)
    (record,) = caplog.records
    assert monitor.summary["direction"] == pytest.approx(0.51) and monitor.summary["warned"] is True
    assert "on average (mean D+ > mean D-)" in record.getMessage()
    assert "most perception tokens" not in record.getMessage()


def test_stays_quiet_when_the_pools_agree_with_the_loss(caplog):
    monitor, trainer = CPLDirectionMonitor(window=2), fake_trainer()
    with caplog.at_level(logging.WARNING):
        step(monitor, trainer, 0.8, 0.001, 0.009)
        step(monitor, trainer, 0.6, 0.001, 0.008)
    assert not caplog.records and monitor.summary["warned"] is False
    assert monitor.summary["direction"] == pytest.approx(0.7)


def test_ignores_runs_without_the_metrics_and_resumes_its_count():
    monitor, trainer = CPLDirectionMonitor(window=2), fake_trainer()
    trainer.callback_metrics = {"train/loss": torch.tensor(1.0)}  # GRPO: nothing to watch
    monitor.on_train_batch_end(trainer, None, None, None, 0)
    assert monitor.state_dict() == {
        "sums": {"direction": 0, "d_plus": 0, "d_minus": 0},
        "steps": 0,
        "summary": None,
    }
    step(monitor, trainer, 0.2, 0.02, 0.01)
    resumed = CPLDirectionMonitor(window=2)
    resumed.load_state_dict(monitor.state_dict())
    step(resumed, trainer, 0.4, 0.02, 0.01)
    assert resumed.summary["steps"] == 2 and resumed.summary["direction"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="window"):
        CPLDirectionMonitor(window=0)
