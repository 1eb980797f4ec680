"""Warn once, early, when CPPO's perturbation pools push the Contrastive Perception Loss the wrong way.

The CPL, ``softplus((D+ - D-) / tau)`` on the perception tokens, assumes that the outputs move less under
the information-preserving view ``I+`` than under the information-removing view ``I-``. CPPO logs how far
that holds in each step: ``train/cpl_direction`` (the fraction of perception tokens with ``D+ < D-``, ties
counted half, so 0.5 means no signal) and
the means ``train/divergence_preserving`` (``D+``) and ``train/divergence_removing`` (``D-``). When most
perception tokens have ``D+ >= D-`` from the start, ``I+`` changes what the task needs (or ``I-`` leaves
it): the loss then trains the policy to ignore exactly that, and the run is likely wasted. This callback
averages the three metrics over the first ``window`` steps that have perception tokens and logs one
warning, naming the numbers and ``cppo audit``, when the mean direction is below ``threshold`` or the mean
``D+`` exceeds the mean ``D-`` (a confident policy ties on most tokens, so the direction alone can sit at
0.5 while the divergences that carry the gradient are larger under ``I+``).

It is a callback rather than part of the module because the core only logs: what to do about the
numbers (warn, stop) is a choice of the run, and the demo configs make it (they list it).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

log = logging.getLogger(__name__)

_METRICS = {
    "direction": "train/cpl_direction",
    "d_plus": "train/divergence_preserving",
    "d_minus": "train/divergence_removing",
}
_PERCEPTION = "train/perception_fraction"


class CPLDirectionMonitor(pl.Callback):
    """Watch the CPL's direction over the first training steps and warn once when it is wrong.

    Steps without perception tokens (``train/perception_fraction`` 0, e.g. every advantage ``<= 0``) are
    not counted: their metrics are 0 by convention. Runs without the metrics (GRPO, PAPO) are ignored.

    Args:
        window: steps with perception tokens averaged before the one check.
        threshold: warn when the mean ``cpl_direction`` over the window is below this (0.5: most
            perception tokens move more under ``I+`` than under ``I-``); it also warns when the mean
            ``D+`` over the window exceeds the mean ``D-``.

    Attributes:
        summary: after the check, ``{"steps", "direction", "d_plus", "d_minus", "warned"}``.
    """

    def __init__(self, window: int = 10, threshold: float = 0.5) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.window = window
        self.threshold = threshold
        self._sums = {name: 0.0 for name in _METRICS}
        self._steps = 0
        self.summary: dict[str, Any] | None = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.summary is not None:
            return
        metrics = trainer.callback_metrics
        if any(key not in metrics for key in _METRICS.values()):
            return
        if _PERCEPTION in metrics and float(metrics[_PERCEPTION]) <= 0:
            return
        for name, key in _METRICS.items():
            self._sums[name] += float(metrics[key])
        self._steps += 1
        if self._steps < self.window:
            return
        means = {name: value / self._steps for name, value in self._sums.items()}
        # Two ways to be wrong: most perception tokens move more under I+ (the direction), or a few move a
        # lot (the mean D+ above the mean D-): on a confident policy most tokens tie and the direction
        # sits near 0.5, while the divergences that carry the gradient say I+ is the stronger change.
        by_count = means["direction"] < self.threshold
        by_size = means["d_plus"] > means["d_minus"]
        wrong = by_count or by_size
        self.summary = {"steps": self._steps, **means, "warned": wrong}
        if wrong and trainer.is_global_zero:
            why = []
            if by_count:
                why.append(
                    f"most perception tokens move more under I+ than under I- (direction below {self.threshold:g})"
                )
            if by_size:
                why.append("the outputs move more under I+ than under I- on average (mean D+ > mean D-)")
            log.warning(
                "CPL direction %.3f, mean D+ %.4g, D- %.4g over the first %d steps with perception tokens (up to "
                "step %d): %s, so the Contrastive Perception Loss pushes the wrong way: the I+ pool probably "
                "changes what the task needs, or the I- pool leaves it. Check the pools with `cppo audit "
                "--config <this config>` (see the README, 'Choosing the perturbation pools').",
                means["direction"],
                means["d_plus"],
                means["d_minus"],
                self._steps,
                trainer.global_step,
                "; ".join(why),
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self._sums), "steps": self._steps, "summary": self.summary}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sums = dict(state_dict["sums"])
        self._steps = int(state_dict["steps"])
        self.summary = state_dict["summary"]
