"""What the audit scores: the views (:class:`AuditView`) and the figures of each view and pair.

:class:`ViewFigures` says what one view does to the policy over a group of questions (accuracy,
divergences to ``I``, entropy shift, CPPO's perception tokens); :class:`PairFigures` says which way the CPL
pushes for one ``(I+, I-)`` pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "ALL",
    "FLOOR",
    "GREY",
    "NEUTRAL_CPL",
    "POOL",
    "AuditView",
    "PairFigures",
    "ViewFigures",
    "pair_key",
]

#: The flat-grey view: the floor, nothing of the image left.
GREY = "grey"
#: Roles of audited views besides the pools' transforms (``"preserving"``, ``"removing"``).
FLOOR = "floor"
POOL = "pool"
#: The group of all examples.
ALL = "all"
#: Neutral value of the CPL, ``softplus(0)``: D+ = D- on average.
NEUTRAL_CPL = math.log(2.0)


@dataclass(frozen=True)
class AuditView:
    """One image view the audit scores.

    Attributes:
        name: its key in the batch's vision inputs (e.g. ``"preserving:0"``).
        role: ``"preserving"`` (a transform of ``I+``), ``"removing"`` (of ``I-``), ``"floor"`` (flat grey)
            or ``"pool"`` (one draw of a pool as configured; then ``pool`` says which).
        label: display name (e.g. ``"ColorJitter"``).
        description: the transform and its arguments.
        probability: the transform's ``p`` in its pool (the audit applies every transform with ``p = 1``).
        candidate: a candidate transform, not part of the configured pool.
        pool: for ``role="pool"``, the pool drawn (``"preserving"`` or ``"removing"``).
    """

    name: str
    role: str
    label: str
    description: str = ""
    probability: float = 1.0
    candidate: bool = False
    pool: str | None = None

    @property
    def sampled(self) -> bool:
        """Whether accuracy is measured under this view (pool draws are only scored)."""
        return self.role != POOL


@dataclass
class ViewFigures:
    """What a view does to the policy, over a group of questions.

    Attributes:
        questions: questions measured.
        accuracy: avg@k under this view (None where not sampled).
        k3: mean ``k3(lp^I, lp^view)`` over the response tokens (the CPL's estimate of the divergence).
        kl: mean exact ``KL(pi(.|I) || pi(.|view))`` over the response tokens.
        entropy_shift: mean ``H(view) - H(I)`` over the response tokens.
        positive_shift_fraction: fraction of response tokens with ``H(view) > H(I)``.
        perception_fraction: fraction of response tokens CPPO would select as perception tokens with this
            view as ``I-`` (``perception_token_mask``, no advantage gating).
        concentration: share of the positive entropy shift carried by those perception tokens.
        tokens: response tokens measured.
    """

    questions: int = 0
    accuracy: float | None = None
    k3: float = 0.0
    kl: float = 0.0
    entropy_shift: float = 0.0
    positive_shift_fraction: float = 0.0
    perception_fraction: float = 0.0
    concentration: float = 0.0
    tokens: int = 0


@dataclass
class PairFigures:
    """The CPL's direction for one ``(I+, I-)`` pair over CPPO's perception tokens.

    Attributes:
        direction: fraction of the perception tokens with ``D+ < D-``, ties (``D+ = D-``) counted half
            (:func:`~cppo_lightning.objectives.functional.cpl_direction_indicator`, as the training metric
            ``cpl_direction``): 1: the views agree with the loss everywhere; 0.5: no signal; below 0.5 the
            loss mostly pushes the wrong way. None without perception tokens.
        d_plus: mean ``D+ = k3(lp^I, lp^{I+})``.
        d_minus: mean ``D- = k3(lp^I, lp^{I-})``.
        cpl: mean ``softplus((D+ - D-) / tau)`` (``log 2`` = neutral).
        tokens: perception tokens.
        ties: fraction of the perception tokens with ``D+ = D-`` (in practice both 0: tokens certain under
            every view, which carry no CPL gradient).
    """

    direction: float | None = None
    d_plus: float = 0.0
    d_minus: float = 0.0
    cpl: float = 0.0
    tokens: int = 0
    ties: float = 0.0


def pair_key(preserving: str, removing: str) -> str:
    """Key of an ``(I+, I-)`` pair in :attr:`AuditResult.pairs`."""
    return f"{preserving}|{removing}"
