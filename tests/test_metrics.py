"""Reward statistics and avg@k, worked out by hand."""

import pytest
import torch

from cppo_lightning.metrics import AverageAccuracy, RewardStatistics


def test_reward_statistics_by_hand():
    metric = RewardStatistics()
    # Two groups of G=3: [1, 0, 1] and [0.5, 0.5, 0.5] (all equal: a zero-variance group).
    metric.update(torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 0.5]), group_size=3)
    values = metric.compute()
    # mean = 3.5 / 6 = 0.58333; unbiased variance = (sum r^2 - n mean^2) / (n - 1)
    #      = (2.75 - 6 * 0.340278) / 5 = 0.141667 -> std 0.376386
    assert values["reward_mean"] == pytest.approx(0.583333, abs=1e-5)
    assert values["reward_std"] == pytest.approx(0.376386, abs=1e-5)
    assert values["zero_variance_groups"] == pytest.approx(0.5)


def test_average_accuracy_is_the_mean_of_per_question_means():
    metric = AverageAccuracy()
    metric.update(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))  # k = 4: 0.25 and 1.0
    metric.update(torch.tensor([[0.0, 1.0]]))  # k = 2: 0.5
    # Per question: (0.25 + 1.0 + 0.5) / 3 = 0.583333. Pooled over the 10 samples it would be
    # (1 + 4 + 1) / 10 = 0.6: the two differ because the questions have different k.
    assert metric.compute() == pytest.approx(1.75 / 3)
    assert metric.compute() != pytest.approx(0.6)
