"""Auditing CPPO's perturbation pools before training: does ``I+`` preserve and ``I-`` remove what the task needs?

CPPO rests on one assumption: the information-preserving view ``I+`` keeps what the answer needs and the
information-removing view ``I-`` takes it away. When it fails, the Contrastive Perception Loss pushes the
wrong way (it makes the policy insensitive to a change that alters the answer). This module measures it
for a policy and a set of views, before any training:

- **accuracy** under the original image ``I``, under each view and under a flat-grey image (the floor:
  nothing of the image left), as sampled avg@k: ``k`` completions per question at the rollout temperature,
  graded by the evaluation grader; the views of a batch are stacked into one ``generate`` call with the same
  random numbers for every view (:class:`SharedNoiseSampler`), so a view that does not change the image
  gives exactly the original's completions and two views' accuracies differ by what the views do;
- **divergences** of the policy's next-token distributions under the view from those under ``I``, on the
  completions sampled under ``I``: the k3 estimate the CPL uses, ``k3(lp^I, lp^view)``, and the exact
  full-vocabulary ``KL(pi(.|I) || pi(.|view))``, and the **entropy shift** ``H(view) - H(I)``, all from one
  forward over the stacked views (:class:`~cppo_lightning.update.RolloutScorer`, the update's own path);
- for every view, as if it were ``I-``: the fraction of tokens whose entropy rises, the perception-token
  fraction CPPO would select (``perception_token_mask`` without gating) and how much of the entropy rise
  those tokens carry (**concentration**);
- the **CPL direction** of each ``(I+ transform, I- transform)`` pair and of the pools as configured: the
  fraction of CPPO's perception tokens (selected with that ``I-``, rows with ``A > 0`` under gating, as in
  training) where ``D+ < D-``, with the mean ``D+``, ``D-`` and CPL (neutral value ``log 2``).

The verdict rule (:class:`VerdictRule`) places each view on a scale from the identity (0: the policy
behaves as with the original image) to the grey floor (1: as with no image), by accuracy and by
divergence:

- ``accuracy_position = (acc(I) - acc(view)) / (acc(I) - acc(grey))``, defined when the policy is at least
  ``min_accuracy_gap`` more accurate with the image than with grey;
- ``divergence_position = KL(view) / KL(grey)``, defined when ``KL(grey) >= min_floor_divergence``;
- ``position`` = the larger of the defined ones (the view moved the policy this far towards "no image"
  by at least one measure); ``inconclusive`` when neither is defined (the policy does not read the image).

An ``I+`` transform is **preserving** when ``position <= preserving_max`` (0.25) and **misplaced** (it removes
what the task needs) when ``position >= removing_min`` (0.5); an ``I-`` transform is **removing** when
``position >= removing_min`` and **misplaced** (it leaves what the task needs) when ``position <=
preserving_max``; in between either is **partial**. Verdicts are given over all examples and per group of
questions (a metadata column, e.g. the synthetic task's ``family``), so that a transform that is harmless
for counting but changes the answer of colour questions is flagged for those.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.generation import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from cppo_lightning.batch import ORIGINAL, PRESERVING, REMOVING, TEXT_KEYS, PromptBatch, concat_vision_inputs
from cppo_lightning.engines.hf import sampling_mode
from cppo_lightning.models.scoring import completion_mask
from cppo_lightning.objectives import ViewRequest, group_advantages, k3_kl, perception_token_mask
from cppo_lightning.objectives.functional import cpl_direction_indicator
from cppo_lightning.rewards import RewardFunctions, reward_inputs
from cppo_lightning.rollout import Rollout, decode, repeat_rows
from cppo_lightning.sampling import RolloutConfig
from cppo_lightning.seeding import derived_seed
from cppo_lightning.update import RolloutScorer

__all__ = [
    "ALL",
    "FLOOR",
    "GREY",
    "POOL",
    "AuditResult",
    "AuditView",
    "PairFigures",
    "PoolAudit",
    "SharedNoiseSampler",
    "Verdict",
    "VerdictRule",
    "ViewFigures",
    "generation_token_ids",
    "pair_key",
    "pair_token_sums",
    "propose_pools",
    "view_token_sums",
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


# ---------------------------------------------------------------------------------------------- token sums


@torch.no_grad()
def view_token_sums(
    logprobs: Tensor,
    logprobs_view: Tensor,
    entropy: Tensor,
    entropy_view: Tensor,
    divergence: Tensor,
    response_mask: Tensor,
    top_ratio: float = 0.5,
) -> dict[str, Tensor]:
    """Per-row sums of what a view does to the policy (summed over rows and batches, then divided).

    Args:
        logprobs (Tensor): [R, T] ``lp^I`` of the sampled tokens.
        logprobs_view (Tensor): [R, T] ``lp^view`` of the same tokens.
        entropy (Tensor): [R, T] ``H(I)``.
        entropy_view (Tensor): [R, T] ``H(view)``.
        divergence (Tensor): [R, T] exact ``KL(pi(.|I) || pi(.|view))``.
        response_mask (Tensor): [R, T] bool.
        top_ratio: CPPO's ``rho`` for the perception tokens this view would select as ``I-``.

    Returns:
        name -> [R] float64 sums over each row's response tokens: ``tokens``, ``k3``, ``kl``,
        ``entropy_shift``, ``positive_shift`` (tokens with ``dH > 0``), ``perception`` (tokens selected),
        ``rise`` (sum of ``max(dH, 0)``), ``rise_perception`` (the same over the selected tokens).
    """
    response = response_mask.bool()
    shift = (entropy_view - entropy).double()
    selected = perception_token_mask(entropy, entropy_view, response, top_ratio=top_ratio)
    rise = shift.clamp(min=0) * response

    def total(values: Tensor) -> Tensor:
        return torch.where(response, values.double(), 0.0).sum(-1)

    return {
        "tokens": response.double().sum(-1),
        "k3": total(k3_kl(logprobs.float(), logprobs_view.float())),
        "kl": total(divergence),
        "entropy_shift": total(shift),
        "positive_shift": ((shift > 0) & response).double().sum(-1),
        "perception": selected.double().sum(-1),
        "rise": rise.sum(-1),
        "rise_perception": (rise * selected).sum(-1),
    }


@torch.no_grad()
def pair_token_sums(
    logprobs: Tensor,
    logprobs_preserving: Tensor,
    logprobs_removing: Tensor,
    entropy: Tensor,
    entropy_removing: Tensor,
    response_mask: Tensor,
    advantages: Tensor | None,
    top_ratio: float = 0.5,
    tau: float = 0.1,
) -> dict[str, Tensor]:
    """Per-row sums of the CPL's direction for one ``(I+, I-)`` pair, over CPPO's perception tokens.

    The perception tokens are selected exactly as CPPO selects them in training (from ``H(I)`` and
    ``H(I-)``, gated by ``A > 0`` when ``advantages`` is given).

    Args:
        logprobs (Tensor): [R, T] ``lp^I``.
        logprobs_preserving (Tensor): [R, T] ``lp^{I+}``.
        logprobs_removing (Tensor): [R, T] ``lp^{I-}``.
        entropy (Tensor): [R, T] ``H(I)``.
        entropy_removing (Tensor): [R, T] ``H(I-)``.
        response_mask (Tensor): [R, T] bool.
        advantages (Tensor, optional): [R]; None: no gating.
        top_ratio: CPPO's ``rho``.
        tau: CPPO's ``tau``.

    Returns:
        name -> [R] float64 sums over each row's perception tokens: ``tokens``, ``direction`` (tokens with
        ``D+ < D-``, ties counted half), ``ties`` (tokens with ``D+ = D-``), ``d_plus``, ``d_minus``, ``cpl``.
    """
    mask = perception_token_mask(
        entropy, entropy_removing, response_mask, top_ratio=top_ratio, advantages=advantages
    )
    d_plus = k3_kl(logprobs.float(), logprobs_preserving.float()).double()
    d_minus = k3_kl(logprobs.float(), logprobs_removing.float()).double()
    cpl = F.softplus((d_plus - d_minus) / tau)

    def total(values: Tensor) -> Tensor:
        return torch.where(mask, values, 0.0).sum(-1)

    return {
        "tokens": mask.double().sum(-1),
        "direction": total(cpl_direction_indicator(d_plus, d_minus)),
        "ties": total((d_plus == d_minus).double()),
        "d_plus": total(d_plus),
        "d_minus": total(d_minus),
        "cpl": total(cpl),
    }


# ---------------------------------------------------------------------------------------------- results


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


def pair_key(preserving: str, removing: str) -> str:
    """Key of an ``(I+, I-)`` pair in :attr:`AuditResult.pairs`."""
    return f"{preserving}|{removing}"


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


class SharedNoiseSampler(LogitsProcessor):
    """Sampling by the Gumbel-max trick with one noise for every copy of a completion.

    ``generate(do_sample=False, logits_processor=[this])`` then draws each next token from
    ``softmax(scores / temperature)`` (after top-k and top-p, as ``generate`` samples), exactly, since the argmax
    of ``log p + Gumbel noise`` is a sample of ``p``. The noise of row ``r`` is that of row ``r % base_rows``:
    copies of the same ``base_rows`` rows stacked under several image views in one call see the same random
    numbers, so a view that leaves the policy unchanged gives exactly the original's completions, and the
    accuracies of two views differ by what the views do, not by sampling noise.

    Args:
        base_rows: rows of one view (``B * k``).
        temperature: sampling temperature.
        top_k: keep the ``top_k`` most likely tokens (0: off).
        top_p: nucleus threshold (1.0: off).
        seed: seed of the noise (the same for every call that must share it).
    """

    def __init__(self, base_rows: int, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        if not temperature > 0:
            raise ValueError(f"the audit samples: temperature must be positive, got {temperature}")
        self.base_rows = base_rows
        self.temperature = temperature
        self.filters = [TopKLogitsWarper(top_k)] if top_k else []
        if top_p < 1.0:
            self.filters.append(TopPLogitsWarper(top_p))
        self.seed = seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.generator is None or self.generator.device != scores.device:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed % 2**63)
        scores = scores.float() / self.temperature
        for warper in self.filters:
            scores = warper(input_ids, scores)
        if scores.shape[0] % self.base_rows:
            raise ValueError(f"{scores.shape[0]} rows are not copies of {self.base_rows} base rows")
        uniform = torch.rand(
            self.base_rows, scores.shape[1], generator=self.generator, device=scores.device
        ).clamp_(min=torch.finfo(torch.float32).tiny)
        gumbel = -torch.log(-torch.log(uniform))
        return scores + gumbel.repeat(scores.shape[0] // self.base_rows, 1)


# ---------------------------------------------------------------------------------------------- the audit


def generation_token_ids(model: nn.Module, tokenizer) -> tuple[list[int], int]:
    """``(eos_token_ids, pad_token_id)`` for ``generate``, from the model's generation config (as in training)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    return eos, pad


class _Sums:
    """Float sums keyed by ``(group, item, name)``."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str], float] = defaultdict(float)

    def add_rows(self, groups: Sequence[str], item: str, sums: Mapping[str, Tensor]) -> None:
        """Add per-row sums ([R] each) to each row's group and to ``"all"``."""
        columns = {name: values.detach().cpu().double().numpy() for name, values in sums.items()}
        for row, group in enumerate(groups):
            for name, values in columns.items():
                value = float(values[row])
                self.values[ALL, item, name] += value
                if group != ALL:
                    self.values[group, item, name] += value

    def get(self, group: str, item: str, name: str) -> float:
        return self.values.get((group, item, name), 0.0)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


class PoolAudit:
    """Runs the audit batch by batch; :meth:`result` gives the figures, verdicts and proposal.

    Args:
        model: the policy (evaluated in eval mode, without gradient).
        tokenizer: its tokenizer (decodes the completions).
        views: the views every batch carries besides ``"original"`` (their names are vision keys).
        grader: the 0/1 grading function ``(prompts, completions, **columns) -> list[float]``.
        reward_model: the training rewards, for the advantages that gate the perception tokens.
        rollout: sampling settings (temperature, top-p, max new tokens).
        samples: ``k`` completions per question and view (at least 2: advantages are group-normalised).
        eos_token_ids: ids that end a completion.
        pad_token_id: padding id for ``generate``.
        top_ratio: CPPO's ``rho``.
        tau: CPPO's ``tau``.
        advantage_gating: select perception tokens only in rows with ``A > 0`` (CPPO's default).
        advantage_scale: ``"std"`` or ``"none"`` (the objective's).
        max_rows: rollouts per stacked forward (the update's ``micro_batch_rollouts``).
        max_tokens: token budget per stacked forward (the update's ``max_tokens_per_forward``).
        chunk_tokens: response positions per chunk of the LM head.
        seed: sampling seed.
        group_key: metadata column that groups the questions (None: no groups).
        rule: the verdict thresholds.
        keep_examples: examples kept (images and completions) for the report.
        view_accuracy: sample and grade under every view; False samples under ``I`` only (the cheap
            mode for large models: the verdicts then rest on the divergences alone).
        max_generate_rows: rows of one ``generate`` call (the views of a batch are stacked into as few
            calls as this allows; None: all views in one call).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        views: Sequence[AuditView],
        grader: Callable[..., Sequence[float]],
        reward_model: RewardFunctions,
        rollout: RolloutConfig,
        samples: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        top_ratio: float = 0.5,
        tau: float = 0.1,
        advantage_gating: bool = True,
        advantage_scale: str = "std",
        max_rows: int | None = None,
        max_tokens: int | None = None,
        chunk_tokens: int | None = None,
        seed: int = 0,
        group_key: str | None = "family",
        rule: VerdictRule = VerdictRule(),
        keep_examples: int = 3,
        view_accuracy: bool = True,
        max_generate_rows: int | None = None,
    ) -> None:
        if samples < 2:
            raise ValueError(f"samples must be >= 2 (advantages are normalised over them), got {samples}")
        names = [view.name for view in views]
        if len(set(names)) != len(names) or ORIGINAL in names:
            raise ValueError(f"audited view names must be unique and not {ORIGINAL!r}: {names}")
        if not any(view.name == GREY and view.role == FLOOR for view in views):
            raise ValueError(f"the audit needs the flat-grey floor view ({GREY!r}, role {FLOOR!r})")
        self.model = model
        self.tokenizer = tokenizer
        self.views = list(views)
        self.grader = grader
        self.reward_model = reward_model
        self.rollout_config = dataclasses.replace(rollout, samples_per_prompt=samples)
        self.samples = samples
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.top_ratio = top_ratio
        self.tau = tau
        self.advantage_gating = advantage_gating
        self.advantage_scale = advantage_scale
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.chunk_tokens = chunk_tokens
        self.seed = seed
        self.group_key = group_key
        self.rule = rule
        self.keep_examples = keep_examples
        self.view_accuracy = view_accuracy
        self.max_generate_rows = max_generate_rows
        self.examples: list[dict[str, Any]] = []
        self.batches = 0
        self.questions = 0
        self.forwards = 0
        self.seconds = {"sampling": 0.0, "scoring": 0.0}
        self._accuracy = _Sums()
        self._views = _Sums()
        self._pairs = _Sums()
        self._group_names: list[str] = []

    # ---- one batch --------------------------------------------------------------------------

    def _groups(self, batch: PromptBatch) -> list[str]:
        groups = []
        for metadata in batch.metadata or [{} for _ in range(len(batch))]:
            value = metadata.get(self.group_key) if self.group_key else None
            groups.append(ALL if value is None else str(value))
        for group in groups:
            if group != ALL and group not in self._group_names:
                self._group_names.append(group)
        return groups

    def _sample(self, batch: PromptBatch, views: list[str], rows: Tensor) -> dict[str, tuple]:
        """Completions of ``rows`` under each view, the views stacked into as few ``generate`` calls as
        ``max_generate_rows`` allows, every view with the same random numbers (:class:`SharedNoiseSampler`)."""
        per_call = max(1, (self.max_generate_rows or len(rows) * len(views)) // len(rows))
        config = self.rollout_config
        out = {}
        for start in range(0, len(views), per_call):
            chunk = views[start : start + per_call]
            pieces = [batch.model_inputs(view, rows) for view in chunk]
            inputs = {
                key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0] if key in TEXT_KEYS
            }
            inputs.update(
                concat_vision_inputs([{k: v for k, v in p.items() if k not in TEXT_KEYS} for p in pieces])
            )
            sampler = SharedNoiseSampler(
                len(rows),
                config.temperature,
                config.top_k,
                config.top_p,
                derived_seed(self.seed, "audit", self.batches),
            )
            with sampling_mode(self.model):
                sequences = self.model.generate(
                    **inputs,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([sampler]),
                    max_new_tokens=config.max_new_tokens,
                    eos_token_id=self.eos_token_ids,
                    pad_token_id=self.pad_token_id,
                    use_cache=True,
                )
            completion = sequences[:, inputs["input_ids"].shape[1] :]
            mask = completion_mask(completion, self.eos_token_ids)
            for number, view in enumerate(chunk):
                block = slice(number * len(rows), (number + 1) * len(rows))
                ids, view_mask = completion[block], mask[block]
                out[view] = (ids, view_mask, decode(self.tokenizer, ids, view_mask))
        return out

    @torch.no_grad()
    def add(self, batch: PromptBatch) -> None:
        """Sample, grade and score one batch of prompts under every view.

        Args:
            batch: prompts carrying ``"original"`` and every audited view.

        Raises:
            KeyError: the batch lacks an audited view.
        """
        missing = [view.name for view in self.views if view.name not in batch.vision]
        if missing:
            raise KeyError(f"the batch lacks the audited views {missing} (it has {list(batch.vision)})")
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        rows = repeat_rows(batch, self.samples, device)
        groups = self._groups(batch)
        row_groups = [groups[i] for i in rows.tolist()]
        prompts, columns = reward_inputs(batch, rows)
        texts: dict[str, list[str]] = {}
        grades: dict[str, list[float]] = {}
        rollout = None
        sampled = [view.name for view in self.views if view.sampled] if self.view_accuracy else []
        started = time.perf_counter()
        completions = self._sample(batch, [ORIGINAL, *sampled], rows)
        for view, (ids, mask, texts[view]) in completions.items():
            grades[view] = [float(value) for value in self.grader(prompts, texts[view], **columns)]
            self._accuracy.add_rows(
                row_groups,
                view,
                {
                    "correct": torch.tensor(grades[view], dtype=torch.float64),
                    "samples": torch.ones(len(rows), dtype=torch.float64),
                },
            )
            if view == ORIGINAL:
                rewards, terms = self.reward_model(batch, rows, texts[view])
                rewards = rewards.to(device)
                rollout = Rollout(
                    example_rows=rows,
                    completion_ids=ids,
                    completion_mask=mask,
                    completions=texts[view],
                    rewards=rewards,
                    reward_terms={name: values.to(device) for name, values in terms.items()},
                    advantages=group_advantages(rewards, self.samples, scale=self.advantage_scale),
                    group_size=self.samples,
                    batch=batch,
                )
        scoring = time.perf_counter()
        self._score(batch, rollout, row_groups)
        self.seconds["sampling"] += scoring - started
        self.seconds["scoring"] += time.perf_counter() - scoring
        self._keep_examples(batch, groups, texts, grades)
        self.questions += len(batch)
        self.batches += 1

    def _score(self, batch: PromptBatch, rollout: Rollout, row_groups: list[str]) -> None:
        """One stacked forward per micro-batch over every view: the update's scoring path."""
        scorer = RolloutScorer(
            self.model,
            batch,
            rollout,
            temperature=self.rollout_config.temperature,
            max_rows=self.max_rows,
            max_tokens=self.max_tokens,
            chunk_tokens=self.chunk_tokens,
        )
        requests = [
            ViewRequest(view.name, with_grad=True, entropy=True, divergence=True) for view in self.views
        ]
        every_row = torch.ones(len(rollout), dtype=torch.bool)
        preserving = [view.name for view in self.views if view.role == PRESERVING]
        removing = [view.name for view in self.views if view.role == REMOVING]
        pools = {view.pool: view.name for view in self.views if view.role == POOL}
        for micro in scorer.plan(range(len(rollout)), scorer.rows_per_rollout(requests, every_row)):
            inputs = scorer.inputs(micro, requests, every_row, entropy=True)
            groups = [row_groups[row] for row in micro.rows]
            gate = inputs.advantages if self.advantage_gating else None
            for view in self.views:
                scores = inputs.views[view.name]
                sums = view_token_sums(
                    inputs.logprobs,
                    scores.logprobs,
                    inputs.entropy,
                    scores.entropy,
                    scores.divergence,
                    inputs.response_mask,
                    self.top_ratio,
                )
                self._views.add_rows(groups, view.name, sums)
            pairs = [(p, r) for p in preserving for r in removing]
            if PRESERVING in pools and REMOVING in pools:
                pairs.append((pools[PRESERVING], pools[REMOVING]))
            for p, r in pairs:
                plus, minus = inputs.views[p], inputs.views[r]
                sums = pair_token_sums(
                    inputs.logprobs,
                    plus.logprobs,
                    minus.logprobs,
                    inputs.entropy,
                    minus.entropy,
                    inputs.response_mask,
                    gate,
                    self.top_ratio,
                    self.tau,
                )
                self._pairs.add_rows(groups, pair_key(p, r), sums)
        self.forwards += scorer.forwards

    def _keep_examples(
        self,
        batch: PromptBatch,
        groups: list[str],
        texts: Mapping[str, list[str]],
        grades: Mapping[str, list[float]],
    ) -> None:
        for index in range(len(batch)):
            if len(self.examples) >= self.keep_examples:
                return
            first = index * self.samples  # the first sample of this question under each view
            self.examples.append(
                {
                    "id": batch.ids[index],
                    "question": batch.questions[index] if batch.questions else "",
                    "answer": batch.answers[index],
                    "group": groups[index],
                    "images": {view: np.asarray(images[index]) for view, images in batch.images.items()},
                    "completions": {
                        view: {"text": texts[view][first], "correct": grades[view][first]} for view in texts
                    },
                }
            )

    # ---- the result -------------------------------------------------------------------------

    def _figures(self, group: str, name: str) -> ViewFigures:
        samples = self._accuracy.get(group, name, "samples")
        accuracy = _ratio(self._accuracy.get(group, name, "correct"), samples) if samples else None
        questions = int(round(self._accuracy.get(group, ORIGINAL, "samples"))) // self.samples
        if name == ORIGINAL:
            tokens = self._views.get(group, GREY, "tokens")
            return ViewFigures(questions=questions, accuracy=accuracy, tokens=int(tokens))
        get = functools.partial(self._views.get, group, name)
        tokens = get("tokens")
        return ViewFigures(
            questions=questions,
            accuracy=accuracy,
            k3=_ratio(get("k3"), tokens),
            kl=_ratio(get("kl"), tokens),
            entropy_shift=_ratio(get("entropy_shift"), tokens),
            positive_shift_fraction=_ratio(get("positive_shift"), tokens),
            perception_fraction=_ratio(get("perception"), tokens),
            concentration=_ratio(get("rise_perception"), get("rise")),
            tokens=int(tokens),
        )

    def _pair(self, group: str, key: str) -> PairFigures:
        get = functools.partial(self._pairs.get, group, key)
        tokens = get("tokens")
        return PairFigures(
            direction=_ratio(get("direction"), tokens) if tokens else None,
            ties=_ratio(get("ties"), tokens),
            d_plus=_ratio(get("d_plus"), tokens),
            d_minus=_ratio(get("d_minus"), tokens),
            cpl=_ratio(get("cpl"), tokens),
            tokens=int(tokens),
        )

    def result(self, settings: Mapping[str, Any] | None = None) -> AuditResult:
        """Figures per group and view, verdicts, CPL directions and the proposed pools.

        Raises:
            ValueError: no batch was added.
        """
        if not self.batches:
            raise ValueError("the audit has no data: add at least one batch")
        groups = [ALL, *self._group_names]
        names = [ORIGINAL, *(view.name for view in self.views)]
        figures = {group: {name: self._figures(group, name) for name in names} for group in groups}
        verdicts = {
            group: {
                view.name: self.rule.verdict(
                    view.role, figures[group][view.name], figures[group][ORIGINAL], figures[group][GREY]
                )
                for view in self.views
                if view.role in (PRESERVING, REMOVING)
            }
            for group in groups
        }
        keys = sorted({key for (_, key, _) in self._pairs.values})
        pairs = {group: {key: self._pair(group, key) for key in keys} for group in groups}
        pools = {view.pool: view.name for view in self.views if view.role == POOL}
        configured = {}
        if PRESERVING in pools and REMOVING in pools:
            key = pair_key(pools[PRESERVING], pools[REMOVING])
            configured = {group: pairs[group].pop(key) for group in groups}
        proposal = propose_pools(self.views, verdicts, pairs)
        info = {
            "questions": self.questions,
            "samples_per_question": self.samples,
            "temperature": self.rollout_config.temperature,
            "max_new_tokens": self.rollout_config.max_new_tokens,
            "accuracy": f"sampled avg@{self.samples}"
            + ("" if self.view_accuracy else " under I only (views: divergences alone)"),
            "top_ratio": self.top_ratio,
            "tau": self.tau,
            "advantage_gating": self.advantage_gating,
            "group_key": self.group_key,
            "forwards": self.forwards,
            "seconds_sampling": round(self.seconds["sampling"], 1),
            "seconds_scoring": round(self.seconds["scoring"], 1),
            "neutral_cpl": NEUTRAL_CPL,
            **(settings or {}),
        }
        return AuditResult(
            views=list(self.views),
            groups=groups,
            figures=figures,
            verdicts=verdicts,
            pairs=pairs,
            configured=configured,
            proposal=proposal,
            rule=self.rule,
            settings=info,
            examples=self.examples,
        )
