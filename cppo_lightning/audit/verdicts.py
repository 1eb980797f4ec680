"""The verdict rule, the audit's result and the pools it proposes.

A view sits between the identity (position 0: the policy behaves as with the original image) and the grey
floor (position 1: as with no image); :class:`VerdictRule` turns that position into a verdict per pool
(see :mod:`cppo_lightning.audit`), and :func:`propose_pools` keeps the transforms that passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cppo_lightning.audit.views import ALL, AuditView, PairFigures, ViewFigures, pair_key
from cppo_lightning.batch import PRESERVING, REMOVING

__all__ = ["AuditResult", "Verdict", "VerdictRule", "propose_pools"]


@dataclass
class Verdict:
    """A view's verdict with the numbers behind it (see :class:`VerdictRule`).

    Attributes:
        label: ``"preserving"``, ``"removing"``, ``"partial"``, ``"misplaced"`` or ``"inconclusive"``.
        position: where the view sits between the identity (0) and the grey floor (1); None if inconclusive.
        accuracy_position: the accuracy-based position (None when the accuracy gap is too small).
        divergence_position: the divergence-based position (None when grey hardly moves the policy).
        reason: one sentence saying why.
    """

    label: str
    position: float | None
    accuracy_position: float | None
    divergence_position: float | None
    reason: str


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the verdicts, relative to the identity (position 0) and the grey floor (position 1).

    Args:
        preserving_max: an ``I+`` transform is preserving up to this position; an ``I-`` transform at or
            below it is misplaced (it leaves what the task needs).
        removing_min: an ``I-`` transform is removing from this position on; an ``I+`` transform at or
            above it is misplaced (it removes what the task needs).
        min_accuracy_gap: the accuracy position is used only when ``acc(I) - acc(grey)`` is at least this
            (below it, accuracy says little about whether the policy reads the image).
        min_floor_divergence: the divergence position is used only when ``KL(grey)`` (mean per response
            token) is at least this.
    """

    preserving_max: float = 0.25
    removing_min: float = 0.5
    min_accuracy_gap: float = 0.1
    min_floor_divergence: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 <= self.preserving_max < self.removing_min:
            raise ValueError(
                f"need 0 <= preserving_max < removing_min, got {self.preserving_max}, {self.removing_min}"
            )
        if self.min_accuracy_gap < 0 or self.min_floor_divergence < 0:
            raise ValueError("min_accuracy_gap and min_floor_divergence must be >= 0")

    def positions(
        self, view: ViewFigures, identity: ViewFigures, floor: ViewFigures
    ) -> tuple[float | None, float | None]:
        """``(accuracy_position, divergence_position)`` of ``view`` (None where not defined).

        Args:
            view: the view's figures.
            identity: the original image's (its accuracy; its divergence is 0 by definition).
            floor: the grey image's.
        """
        accuracy = None
        if view.accuracy is not None and identity.accuracy is not None and floor.accuracy is not None:
            gap = identity.accuracy - floor.accuracy
            if gap >= self.min_accuracy_gap:
                accuracy = (identity.accuracy - view.accuracy) / gap
        divergence = view.kl / floor.kl if floor.kl >= self.min_floor_divergence else None
        return accuracy, divergence

    def verdict(self, role: str, view: ViewFigures, identity: ViewFigures, floor: ViewFigures) -> Verdict:
        """The verdict of a transform of the ``role`` pool (``"preserving"`` or ``"removing"``).

        Raises:
            ValueError: an unknown role.
        """
        if role not in (PRESERVING, REMOVING):
            raise ValueError(f"a verdict is for a 'preserving' or 'removing' transform, got role {role!r}")
        accuracy, divergence = self.positions(view, identity, floor)
        defined = [value for value in (accuracy, divergence) if value is not None]
        numbers = _position_text(accuracy, divergence)
        if not defined:
            return Verdict(
                "inconclusive",
                None,
                None,
                None,
                "the policy does not read the image here: grey changes neither its accuracy "
                f"(gap < {self.min_accuracy_gap:g}) nor its distributions (KL < {self.min_floor_divergence:g})",
            )
        position = max(defined)
        if role == PRESERVING:
            if position <= self.preserving_max:
                label, why = PRESERVING, f"keeps the policy near the identity ({numbers})"
            elif position >= self.removing_min:
                label, why = "misplaced", f"removes what the task needs: at least halfway to grey ({numbers})"
            else:
                label, why = "partial", f"removes part of what the task needs ({numbers})"
        else:
            if position >= self.removing_min:
                label, why = REMOVING, f"moves the policy at least halfway to grey ({numbers})"
            elif position <= self.preserving_max:
                label, why = "misplaced", f"leaves what the task needs: close to the identity ({numbers})"
            else:
                label, why = "partial", f"removes only part of what the task needs ({numbers})"
        return Verdict(label, position, accuracy, divergence, why)


def _position_text(accuracy: float | None, divergence: float | None) -> str:
    parts = []
    if accuracy is not None:
        parts.append(f"accuracy position {accuracy:.2f}")
    if divergence is not None:
        parts.append(f"KL position {divergence:.2f}")
    return ", ".join(parts)


@dataclass
class AuditResult:
    """Everything the audit measured and concluded.

    Attributes:
        views: the audited views (transforms of each pool, candidates, the grey floor, the pool draws).
        groups: group names, ``"all"`` first.
        figures: group -> view name -> :class:`ViewFigures` (``"original"`` included).
        verdicts: group -> view name -> :class:`Verdict` (transforms of the two pools and candidates).
        pairs: group -> ``"I+ name|I- name"`` -> :class:`PairFigures`.
        configured: group -> the CPL direction of the pools as configured (one draw of each per example).
        proposal: see :func:`propose_pools`.
        rule: the verdict thresholds.
        settings: how the audit ran (examples, samples, temperature, grader, seconds, ...).
        examples: a few examples for the report: id, question, answer, group, images (view -> uint8
            ``[H, W, 3]``) and completions (view -> ``{"text", "correct"}``).
    """

    views: list[AuditView]
    groups: list[str]
    figures: dict[str, dict[str, ViewFigures]]
    verdicts: dict[str, dict[str, Verdict]]
    pairs: dict[str, dict[str, PairFigures]]
    configured: dict[str, PairFigures]
    proposal: dict[str, Any]
    rule: VerdictRule
    settings: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def view(self, name: str) -> AuditView:
        """The audited view called ``name``."""
        return next(view for view in self.views if view.name == name)

    def transforms(self, role: str, candidates: bool | None = None) -> list[AuditView]:
        """The transforms of one pool (``candidates``: only candidates, only configured, or both)."""
        return [
            view
            for view in self.views
            if view.role == role and (candidates is None or view.candidate == candidates)
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (examples without their images)."""
        return {
            "settings": self.settings,
            "rule": dataclasses.asdict(self.rule),
            "views": [dataclasses.asdict(view) for view in self.views],
            "groups": self.groups,
            "figures": {
                group: {name: dataclasses.asdict(value) for name, value in views.items()}
                for group, views in self.figures.items()
            },
            "verdicts": {
                group: {name: dataclasses.asdict(value) for name, value in views.items()}
                for group, views in self.verdicts.items()
            },
            "pairs": {
                group: {name: dataclasses.asdict(value) for name, value in pairs.items()}
                for group, pairs in self.pairs.items()
            },
            "configured_pools": {
                group: dataclasses.asdict(value) for group, value in self.configured.items()
            },
            "proposal": self.proposal,
            "examples": [
                {key: value for key, value in example.items() if key != "images"} for example in self.examples
            ],
        }


def propose_pools(
    views: Sequence[AuditView],
    verdicts: Mapping[str, Mapping[str, Verdict]],
    pairs: Mapping[str, Mapping[str, PairFigures]],
) -> dict[str, Any]:
    """Pools from the audited transforms that passed: ``I+`` preserving and ``I-`` removing.

    A transform is kept when its verdict over all examples is its pool's good verdict and no group of
    questions calls it misplaced; an ``I+`` transform also must not be partial for any group (one that
    removes part of what a group's answers need makes the CPL teach the policy to ignore that part, while
    an ``I-`` that removes only part merely weakens the contrast). The expected CPL direction of the proposal is the mean over its
    ``(I+, I-)`` pairs (each transform applied, i.e. ``p = 1``; every pair equally likely, as a uniform
    draw from each pool makes them).

    Returns:
        ``preserving`` and ``removing`` (names kept), ``dropped`` (name -> reason), ``direction`` (None when
        a pool is empty), and ``complete`` (both pools non-empty).
    """
    kept: dict[str, list[str]] = {PRESERVING: [], REMOVING: []}
    dropped: dict[str, str] = {}
    for view in views:
        if view.role not in kept:
            continue
        overall = verdicts[ALL][view.name]
        misplaced_in = [
            group
            for group, by_view in verdicts.items()
            if group != ALL and by_view[view.name].label == "misplaced"
        ]
        partial_in = [
            group
            for group, by_view in verdicts.items()
            if group != ALL and view.role == PRESERVING and by_view[view.name].label == "partial"
        ]
        if overall.label == view.role and not misplaced_in and not partial_in:
            kept[view.role].append(view.name)
        elif misplaced_in or partial_in:
            reasons = [f"misplaced for {', '.join(misplaced_in)}"] if misplaced_in else []
            reasons += [f"partial for {', '.join(partial_in)}"] if partial_in else []
            dropped[view.name] = "; ".join(reasons)
        else:
            dropped[view.name] = f"{overall.label} over all questions"
    values = [pairs[ALL][pair_key(p, r)].direction for p in kept[PRESERVING] for r in kept[REMOVING]]
    values = [value for value in values if value is not None]
    direction = float(np.mean(values)) if values else None
    return {
        PRESERVING: kept[PRESERVING],
        REMOVING: kept[REMOVING],
        "dropped": dropped,
        "direction": direction,
        "complete": bool(kept[PRESERVING] and kept[REMOVING]),
    }


# ---------------------------------------------------------------------------------------------- sampling
