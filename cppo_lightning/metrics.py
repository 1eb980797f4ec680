"""torchmetrics for RL fine-tuning: reward statistics of a rollout batch and avg@k accuracy.

Both sync across processes (DDP): statistics are computed over every rank's rollouts, not averaged
per rank.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from cppo_lightning.objectives.functional import zero_variance_groups


class RewardStatistics(Metric):
    """Mean and (unbiased) standard deviation of rewards, and the fraction of zero-variance groups.

    A group is the ``G`` rollouts of one prompt; when all its rewards are equal its advantages are 0 and
    it teaches nothing, so that fraction is the first thing to watch in GRPO-style training.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("total", "total_squares", "count", "zero_variance_groups", "groups"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rewards: Tensor, group_size: int) -> None:
        """Add one rollout batch.

        Args:
            rewards (Tensor): [N * G] rewards, the ``G`` rollouts of each prompt contiguous.
            group_size: ``G``.
        """
        rewards = rewards.detach().to(torch.float64)
        self.total += rewards.sum()
        self.total_squares += (rewards**2).sum()
        self.count += rewards.numel()
        groups = rewards.view(-1, group_size)
        self.zero_variance_groups += zero_variance_groups(groups).sum()
        self.groups += groups.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``reward_mean``, ``reward_std`` and ``zero_variance_groups`` (a fraction)."""
        mean = self.total / self.count
        variance = (self.total_squares - self.count * mean**2) / (self.count - 1).clamp(min=1)
        return {
            "reward_mean": mean.float(),
            "reward_std": variance.clamp(min=0).sqrt().float(),
            "zero_variance_groups": (self.zero_variance_groups / self.groups).float(),
        }


class AverageAccuracy(Metric):
    """avg@k: accuracy averaged over the ``k`` samples of each question, then over questions."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("questions", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Tensor) -> None:
        """Add graded samples.

        Args:
            correct (Tensor): [Q, k] 0/1 grades of ``k`` samples for each of ``Q`` questions.
        """
        correct = correct.detach().to(torch.float64)
        self.correct += correct.mean(dim=1).sum()
        self.questions += correct.shape[0]

    def compute(self) -> Tensor:
        """The mean per-question accuracy."""
        return (self.correct / self.questions.clamp(min=1)).float()
