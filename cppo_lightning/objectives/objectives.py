"""Objective classes: GRPO, CPPO and PAPO composed from the functions in ``functional``.

An objective tells the training module what it needs (reference log-probs, entropies, which
perturbed image views, for which rows) and turns those tensors into a loss, metrics and
diagnostics. It is chosen in YAML by ``class_path: cppo_lightning.objectives.CPPO``; its fields are
the hyperparameters, with the defaults of the CPPO paper (arXiv 2601.00501) and its reference release.

The contract with the module, for one micro-batch of ``R`` rollouts and ``T`` response positions:

1. ``view_requests()`` and ``view_rows(advantages)``: which image views to score, for which rows.
2. ``select_tokens(inputs)`` (CPPO): tokens chosen without gradient before the loss, whose count
   over the whole mini-batch normalises a loss term. The module sums the masks over the
   mini-batch (a no-grad pass first when the mini-batch spans several micro-batches) and passes
   the totals back in ``inputs.counts``, so the loss does not depend on the micro-batch size.
3. ``__call__(inputs) -> ObjectiveOutput``: this micro-batch's share of the mini-batch loss.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cppo_lightning.batch import MASKED, PRESERVING, REMOVING
from cppo_lightning.objectives.functional import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    DIVERGENCES,
    ROLLOUT_CORRECTIONS,
    BatchCounts,
    clipped_policy_loss,
    contrastive_perception_loss,
    contrastive_perception_loss_from_divergences,
    double_entropy_loss,
    implicit_perception_loss,
    k3_kl,
    masked_aggregate,
    perception_token_mask,
    rollout_correction_weights,
    token_mean,
)

__all__ = [
    "PRESERVING",
    "REMOVING",
    "MASKED",
    "ViewRequest",
    "ViewScores",
    "TokenSelection",
    "ObjectiveInputs",
    "ObjectiveOutput",
    "Objective",
    "Requirements",
    "GRPO",
    "CPPO",
    "PAPO",
]


@dataclass(frozen=True)
class ViewRequest:
    """What an objective needs from one perturbed image view.

    Args:
        name: ``"preserving"`` (I+), ``"removing"`` (I-) or ``"masked"`` (PAPO).
        with_grad: True: computed in the update forward with gradient, for ``view_rows``.
            False: computed once before the update under no_grad with the pre-update policy, for
            every row.
        entropy: The full-vocabulary entropy under this view is needed.
        divergence: The exact full-vocabulary ``KL(pi(.|I) || pi(.|view))`` per token is needed
            (computed chunk by chunk, with gradient).
    """

    name: str
    with_grad: bool
    entropy: bool = False
    divergence: bool = False


@dataclass
class ViewScores:
    """The policy on one perturbed view, dense over the ``R`` rows of a micro-batch.

    Rows for which the view was not computed hold the original image's values: ``lp^I``
    (detached) and ``H^I``, so that any divergence or entropy shift there is exactly 0.

    Args:
        logprobs: [R, T] sampled-token log-probs under the view.
        rows: [R] bool, the rows that have the view.
        entropy: [R, T] full-vocabulary entropy under the view (no gradient), if requested.
        divergence: [R, T] exact ``KL(pi(.|I) || pi(.|view))`` (0 outside ``rows``), if requested.
    """

    logprobs: Tensor
    rows: Tensor
    entropy: Tensor | None = None
    divergence: Tensor | None = None


@dataclass
class TokenSelection:
    """Tokens an objective selects without gradient before computing its loss.

    Args:
        masks: count name -> [R, T] bool mask. The module sums each over the mini-batch (all
            ranks) into ``BatchCounts.totals[name]``.
        metrics: detached 0-dim metric shares (see :class:`BatchCounts`).
        diagnostics: [R, T] tensors the callbacks draw (CPPO: ``entropy``, ``entropy_removed``,
            ``perception_mask``).
    """

    masks: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ObjectiveInputs:
    """Everything an objective reads for one micro-batch.

    Args:
        logprobs: [R, T] ``lp^I`` under the current policy, with gradient.
        response_mask: [R, T] bool, True on response (non-padding) tokens.
        advantages: [R] one advantage per rollout.
        old_logprobs: [R, T] rollout-policy log-probs; None means ``lp_old = lp.detach()``
            (one optimizer step per rollout batch, sampled by the trained network itself).
        ref_logprobs: [R, T] reference-policy log-probs; present iff ``needs_reference``.
        sampler_logprobs: [R, T] log-probs the rollout engine reported for its samples; present iff
            ``rollout_correction`` is not ``"none"``.
        entropy: [R, T] full-vocab entropy under ``I`` (no gradient), when computed.
        views: Scores on the perturbed views, keyed by ``ViewRequest.name``.
        counts: The mini-batch's denominators (None: this micro-batch is the whole mini-batch).
        selected: token masks chosen beforehand (``select_tokens(...).masks`` from the module's
            no-grad pass, so that their mini-batch totals are known before any backward);
            ``select_tokens`` then uses them instead of choosing again.
    """

    logprobs: Tensor
    response_mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    sampler_logprobs: Tensor | None = None
    entropy: Tensor | None = None
    views: dict[str, ViewScores] = field(default_factory=dict)
    counts: BatchCounts | None = None
    selected: dict[str, Tensor] | None = None


@dataclass
class ObjectiveOutput:
    """What an objective returns for one micro-batch.

    Args:
        loss: 0-dim, this micro-batch's share of the mini-batch loss (the shares add up to it).
        metrics: detached 0-dim shares of the mini-batch metrics (see "Logged metrics").
        diagnostics: [R, T] tensors for callbacks (e.g. CPPO's perception mask).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Requirements:
    """Everything the update must compute for an objective on one rollout batch, stated in one call.

    Args:
        reference: reference-policy log-probs (``beta > 0``).
        entropy: the full-vocabulary entropy under ``I`` (for the token selection).
        views: the perturbed views (:class:`ViewRequest`).
        view_rows: [N] bool, the rollout rows that get the with-gradient views.
        selects_tokens: ``select_tokens`` returns masks whose mini-batch totals normalise the loss.
        normalises_over_mini_batch: False for the release's per-micro-batch aggregation.
        sampler_logprobs: the sampler's log-probs of every rollout (``rollout_correction``).
    """

    reference: bool
    entropy: bool
    views: tuple[ViewRequest, ...]
    view_rows: Tensor
    selects_tokens: bool
    normalises_over_mini_batch: bool
    sampler_logprobs: bool = False

    @property
    def grad_views(self) -> tuple[ViewRequest, ...]:
        """Views scored in the update's forwards, with gradient, for ``view_rows``."""
        return tuple(view for view in self.views if view.with_grad)

    @property
    def frozen_views(self) -> tuple[str, ...]:
        """Views scored once before the update, without gradient, for every row."""
        return tuple(view.name for view in self.views if not view.with_grad)

    @property
    def selection_views(self) -> tuple[ViewRequest, ...]:
        """With-gradient views whose entropy the token selection reads."""
        return tuple(view for view in self.grad_views if view.entropy)

    @property
    def needs_advance_selection(self) -> bool:
        """Token masks must be known for the whole mini-batch before any micro-batch's backward."""
        return self.selects_tokens and self.normalises_over_mini_batch


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_shape(name: str, tensor: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {what} {shape}")


@dataclass
class Objective(ABC):
    """GRPO semantics shared by every objective: clipped policy gradient + ``beta`` * k3 KL.

    ``L = L_PG + beta * L_KL`` with the PPO clipped surrogate (dual clip for ``A < 0``) and the
    k3 estimate of KL(pi || pi_ref) at the sampled tokens, both aggregated over the response
    tokens with ``aggregation``. Subclasses add terms in ``auxiliary_loss``.

    Logged metrics:
        - ``loss``: the total loss.
        - ``policy_loss``: ``L_PG``.
        - ``kl``: ``L_KL``, k3 KL to the reference (when reference log-probs are given).
        - ``clip_fraction``: fraction of response tokens where the clipped ratio is used.
        - ``dual_clip_fraction``: fraction of response tokens bounded by the dual clip.
        - ``ratio_mean``: mean importance ratio over response tokens.
        - ``entropy``: mean full-vocab entropy under ``I`` (when the module computes it).
        - ``is_weight_mean``: with a rollout correction, the mean weight ``w`` applied (over response
          tokens for the token modes, over responses for the sequence modes).
        - ``is_truncated_fraction`` (``*_truncate``) or ``is_masked_fraction`` (``*_mask``): the
          fraction of response tokens (token modes) or responses (sequence modes) whose weight the
          cap or the band changed.

    Args:
        beta: Weight of the k3 KL to the reference policy; 0 skips the reference forward.
        eps_low: Lower clip range of the importance ratio (``rho >= 1 - eps_low``).
        eps_high: Upper clip range of the importance ratio (``rho <= 1 + eps_high``).
        dual_clip: Dual-clip constant (> 1) bounding the loss of tokens with negative
            advantage; None disables it.
        aggregation: How per-token losses are reduced over a mini-batch: ``"token-mean"``,
            ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` (Dr. GRPO), all independent of the
            micro-batch size, or ``"micro-batch-token-mean"``, the reference release's token-mean
            per micro-batch averaged over micro-batches (also for the CPL's masked mean).
        advantage_scale: ``"std"`` (GRPO) or ``"none"`` (Dr. GRPO, no division by the group
            std); read by the training module when it computes advantages.
        rollout_correction: Correct the policy gradient for rollouts sampled by another network
            than the trained one (vLLM): ``"none"`` (default), ``"token_truncate"``,
            ``"token_mask"``, ``"sequence_truncate"`` or ``"sequence_mask"``. The detached weight
            ``w = pi_old / pi_sampler`` (per token, or the geometric mean over a response's tokens)
            multiplies the clipped policy-gradient term only, never the KL or perception terms;
            see :func:`~cppo_lightning.objectives.functional.rollout_correction_weights`.
        correction_cap: Truncation level of the ``*_truncate`` modes (>= 1; TIS: 2).
        correction_band: ``[low, high]`` weights kept by the ``*_mask`` modes (``low <= 1 <= high``);
            a token or response outside it leaves the policy gradient.
    """

    beta: float = 0.01
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    aggregation: str = "token-mean"
    advantage_scale: str = "std"
    rollout_correction: str = "none"
    correction_cap: float = 2.0
    correction_band: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self) -> None:
        _require(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        _require(0 <= self.eps_low < 1, f"eps_low must be in [0, 1), got {self.eps_low}")
        _require(self.eps_high >= 0, f"eps_high must be >= 0, got {self.eps_high}")
        _require(
            self.dual_clip is None or self.dual_clip > 1,
            f"dual_clip must be > 1 or None, got {self.dual_clip}",
        )
        _require(
            self.aggregation in AGGREGATIONS,
            f"unknown aggregation {self.aggregation!r}; expected one of {', '.join(AGGREGATIONS)}",
        )
        _require(
            self.advantage_scale in ADVANTAGE_SCALES,
            f"unknown advantage_scale {self.advantage_scale!r}; expected one of {', '.join(ADVANTAGE_SCALES)}",
        )
        _require(
            self.rollout_correction in ROLLOUT_CORRECTIONS,
            f"unknown rollout_correction {self.rollout_correction!r}; expected one of "
            f"{', '.join(ROLLOUT_CORRECTIONS)}",
        )
        # A token the sampler and the policy agree on (w = 1) must pass unchanged.
        _require(
            self.correction_cap >= 1,
            f"correction_cap must be >= 1 (a weight of 1 must pass unchanged), got {self.correction_cap}",
        )
        band = tuple(self.correction_band)  # a list from YAML or a checkpoint
        _require(
            len(band) == 2 and 0 <= band[0] <= 1 <= band[1],
            f"correction_band must be [low, high] with 0 <= low <= 1 <= high, got {list(band)}",
        )
        self.correction_band = (float(band[0]), float(band[1]))

    # ---- what the training module must compute -------------------------------------------

    @property
    def needs_reference(self) -> bool:
        """Reference-policy log-probs are needed (``beta > 0``)."""
        return self.beta > 0

    @property
    def needs_entropy(self) -> bool:
        """The full-vocab entropy under the original image is needed (by ``select_tokens``)."""
        return False

    @property
    def selects_tokens(self) -> bool:
        """Whether ``select_tokens`` returns a selection whose mini-batch count normalises the loss."""
        return False

    @property
    def normalises_over_mini_batch(self) -> bool:
        """False for the release's per-micro-batch aggregation (no mini-batch totals needed)."""
        return self.aggregation != "micro-batch-token-mean"

    def view_requests(self) -> list[ViewRequest]:
        """The perturbed image views this objective needs (none for GRPO)."""
        return []

    def requirements(self, advantages: Tensor) -> Requirements:
        """What the update must compute for a rollout batch with these [N] advantages."""
        return Requirements(
            reference=self.needs_reference,
            entropy=self.needs_entropy,
            views=tuple(self.view_requests()),
            view_rows=self.view_rows(advantages.detach().cpu()),
            selects_tokens=self.selects_tokens,
            normalises_over_mini_batch=self.normalises_over_mini_batch,
            sampler_logprobs=self.rollout_correction != "none",
        )

    def view_rows(self, advantages: Tensor) -> Tensor:
        """Rows for which the with-gradient views must be computed.

        Args:
            advantages (Tensor): [R] advantages of the micro-batch.

        Returns:
            Tensor: [R] bool.
        """
        return torch.zeros_like(advantages, dtype=torch.bool)

    def select_tokens(self, inputs: ObjectiveInputs) -> TokenSelection | None:
        """Tokens selected without gradient (see the module docstring); None for GRPO and PAPO.

        The module's no-grad pass calls it on the ``view_rows`` only, with only what that pass
        computes: ``entropy`` if ``needs_entropy`` and the views whose request asks for ``entropy``.
        So a selection must be empty outside ``view_rows``. Masks given in ``inputs.selected`` are
        used as they are; metrics and diagnostics are computed from ``inputs``.
        """
        return None

    def counts(self, inputs: ObjectiveInputs) -> BatchCounts:
        """The denominators this objective aggregates with (its own for the release's aggregation)."""
        counts = inputs.counts if inputs.counts is not None else BatchCounts()
        return counts if self.normalises_over_mini_batch else counts.local()

    # ---- the loss ---------------------------------------------------------------------------

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        """Loss of one micro-batch.

        Non-finite values are not checked here (each check is a device sync): they make the loss
        non-finite, and the training module skips that optimizer step and counts it.

        Args:
            inputs: The tensors listed in ``ObjectiveInputs``; the views of ``view_requests``.

        Returns:
            ObjectiveOutput: the 0-dim loss to minimise (this micro-batch's share), detached
            0-dim metrics (see "Logged metrics") and diagnostics.
        """
        self._check_inputs(inputs)
        counts = self.counts(inputs)
        logprobs = inputs.logprobs
        response = inputs.response_mask.bool()
        old = inputs.old_logprobs if inputs.old_logprobs is not None else logprobs.detach()
        weights, correction_metrics = self.correction(old, inputs.sampler_logprobs, response, counts)
        loss, metrics = clipped_policy_loss(
            logprobs,
            old,
            inputs.advantages,
            response,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            dual_clip=self.dual_clip,
            aggregation=self.aggregation,
            counts=counts,
            weights=weights,
        )
        metrics.update(correction_metrics)
        metrics["policy_loss"] = loss.detach()
        if inputs.ref_logprobs is not None:
            kl = masked_aggregate(
                k3_kl(logprobs, inputs.ref_logprobs.detach()), response, self.aggregation, counts=counts
            )
            metrics["kl"] = kl.detach()
            if self.beta > 0:
                loss = loss + self.beta * kl
        if inputs.entropy is not None:
            metrics["entropy"] = token_mean(inputs.entropy, response, counts)
        extra, extra_metrics, diagnostics = self.auxiliary_loss(inputs, counts)
        if extra is not None:
            loss = loss + extra
        metrics.update(extra_metrics)
        metrics["loss"] = loss.detach()
        return ObjectiveOutput(loss, metrics, diagnostics)

    def correction(
        self, old_logprobs: Tensor, sampler_logprobs: Tensor | None, response: Tensor, counts: BatchCounts
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The rollout correction's weights (None without one) and its metric shares."""
        mode = self.rollout_correction
        if mode == "none":
            return None, {}
        weights, changed = rollout_correction_weights(
            old_logprobs, sampler_logprobs, response, mode, self.correction_cap, self.correction_band
        )
        changed_name = "is_truncated_fraction" if mode.endswith("truncate") else "is_masked_fraction"
        if mode.startswith("token"):
            return weights, {
                "is_weight_mean": token_mean(weights, response, counts),
                changed_name: token_mean(changed.float(), response, counts),
            }
        # Sequence modes: one weight per response, averaged over the responses that have tokens.
        has_tokens = response.any(dim=-1, keepdim=True)
        return weights, {
            "is_weight_mean": token_mean(weights[:, :1], has_tokens, counts, key="sequences"),
            changed_name: token_mean(changed[:, :1].float(), has_tokens, counts, key="sequences"),
        }

    def auxiliary_loss(
        self, inputs: ObjectiveInputs, counts: BatchCounts
    ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """Terms a subclass adds to ``L_PG + beta * L_KL`` (already weighted), metrics, diagnostics."""
        return None, {}, {}

    # ---- input checks (shapes only: free, no device sync) -------------------------------------

    def _check_inputs(self, inputs: ObjectiveInputs) -> None:
        logprobs = inputs.logprobs
        _require(logprobs.dim() == 2, f"logprobs must be [R, T], got shape {tuple(logprobs.shape)}")
        shape = tuple(logprobs.shape)
        _check_shape("response_mask", inputs.response_mask, shape, "logprobs has shape")
        _check_shape("advantages", inputs.advantages, shape[:1], "expected [R] =")
        for name in ("old_logprobs", "ref_logprobs", "sampler_logprobs", "entropy"):
            tensor = getattr(inputs, name)
            if tensor is not None:
                _check_shape(name, tensor, shape, "logprobs has shape")
        if self.needs_reference and inputs.ref_logprobs is None:
            raise ValueError(
                f"{type(self).__name__} with beta={self.beta} needs ObjectiveInputs.ref_logprobs"
            )
        if self.rollout_correction != "none" and inputs.sampler_logprobs is None:
            raise ValueError(
                f"{type(self).__name__} with rollout_correction={self.rollout_correction!r} needs "
                "ObjectiveInputs.sampler_logprobs (the rollout engine's log-probs)"
            )
        for name, view in inputs.views.items():
            _check_shape(f"views[{name!r}].logprobs", view.logprobs, shape, "logprobs has shape")
            _check_shape(f"views[{name!r}].rows", view.rows, shape[:1], "expected [R] =")
            _require(view.rows.dtype == torch.bool, f"views[{name!r}].rows must be a bool [R] mask")
            for part in ("entropy", "divergence"):
                tensor = getattr(view, part)
                if tensor is not None:
                    _check_shape(f"views[{name!r}].{part}", tensor, shape, "logprobs has shape")

    def _view(self, inputs: ObjectiveInputs, name: str, part: str | None = None) -> ViewScores:
        """The named view (and, if given, the named optional part of it), or a clear error."""
        if name not in inputs.views:
            raise ValueError(
                f"{type(self).__name__} needs the {name!r} view but ObjectiveInputs.views has "
                f"{sorted(inputs.views)}"
            )
        view = inputs.views[name]
        if part is not None and getattr(view, part) is None:
            raise ValueError(f"{type(self).__name__} needs views[{name!r}].{part}")
        return view

    # ---- configuration ----------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: plain data that rebuilds this objective."""
        cls = type(self)
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            # Tuples as lists: YAML (hparams.yaml, config.yaml) reads them back without Python tags.
            "init_args": {
                f.name: list(value) if isinstance(value := getattr(self, f.name), tuple) else value
                for f in dataclasses.fields(self)
            },
        }

    @staticmethod
    def from_config(config: dict[str, Any]) -> Objective:
        """Rebuild an objective from :meth:`config` output (or the same YAML form).

        Raises:
            ValueError: the class path does not name an :class:`Objective`.
        """
        module_name, _, name = config["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), name, None)
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise ValueError(f"{config['class_path']!r} is not an Objective class")
        return cls(**config.get("init_args", {}))


@dataclass
class GRPO(Objective):
    """GRPO: ``L = L_PG + beta * L_KL``; no perturbed views.

    Logged metrics:
        - ``loss``, ``policy_loss``, ``kl``, ``clip_fraction``, ``dual_clip_fraction``,
          ``ratio_mean``, ``entropy``: see ``Objective``.

    Args: those of :class:`Objective` (beta, the clip ranges, aggregation, advantage scale, rollout
    correction).
    """


@dataclass
class CPPO(GRPO):
    """CPPO: GRPO plus the Contrastive Perception Loss on perception tokens.

    ``L = L_PG + beta * L_KL + cpl_weight * L_CPL``. Perception tokens are the top
    ``top_ratio`` response tokens of each row by relative entropy rise under the
    information-removing view; with advantage gating only rows with ``A > 0`` take part. The
    views are requested only for ``view_rows`` (the ``A > 0`` rows under gating): every other
    row has ``M = 0``, so the loss and its gradients are exactly those of computing the views
    for every row, as in the release. ``L_CPL`` is the mean over the perception tokens of the
    whole mini-batch (all ranks), found by ``select_tokens`` before the loss.

    Logged metrics:
        - ``loss``, ``policy_loss``, ``kl``, ``clip_fraction``, ``dual_clip_fraction``,
          ``ratio_mean``, ``entropy``: see ``Objective``.
        - ``cpl``: mean contrastive perception loss over the perception tokens.
        - ``divergence_preserving``: mean ``D+`` over the perception tokens.
        - ``divergence_removing``: mean ``D-`` over the perception tokens.
        - ``cpl_direction``: fraction of the perception tokens with ``D+ < D-`` (below 0.5 the
          pools push the loss the wrong way: see ``cppo audit``).
        - ``perception_fraction``: perception tokens / response tokens.
        - ``gated_fraction``: fraction of rows removed by advantage gating (``A <= 0``);
          0 without gating.
        - ``entropy_shift``: mean ``H^{I-} - H^I`` over the response tokens of the view rows
          (with the perception mask).

    Args (besides those of :class:`Objective`):
        cpl_weight: ``lambda``, weight of the Contrastive Perception Loss (release: 0.01).
        tau: Temperature of the CPL softplus, positive.
        top_ratio: ``rho`` in (0, 1], fraction of each row's eligible tokens kept as
            perception tokens.
        perception_mask: Select perception tokens by entropy shift; False applies the CPL to
            every response token (ablation).
        advantage_gating: Apply the CPL only to rows with ``A > 0``; False applies it to every
            row (ablation; then the views are computed for every row).
        divergence: ``"k3"`` (sampled-token estimate, release) or ``"full_kl"`` (exact
            full-vocabulary KL, ablation; computed chunk by chunk from the hidden states).
    """

    cpl_weight: float = 0.01
    tau: float = 0.1
    top_ratio: float = 0.5
    perception_mask: bool = True
    advantage_gating: bool = True
    divergence: str = "k3"

    #: The count name of the perception tokens in ``BatchCounts.totals``.
    SELECTION = "perception"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.cpl_weight >= 0, f"cpl_weight must be >= 0, got {self.cpl_weight}")
        _require(self.tau > 0, f"tau must be positive, got {self.tau}")
        _require(0 < self.top_ratio <= 1, f"top_ratio must be in (0, 1], got {self.top_ratio}")
        _require(
            self.divergence in DIVERGENCES,
            f"unknown divergence {self.divergence!r}; expected one of {', '.join(DIVERGENCES)}",
        )

    @property
    def needs_entropy(self) -> bool:
        """Entropy under ``I`` is needed to find perception tokens."""
        return self.perception_mask

    @property
    def selects_tokens(self) -> bool:
        """The perception tokens: their mini-batch count normalises the CPL."""
        return True

    def view_requests(self) -> list[ViewRequest]:
        """I+ and I-, both with gradient; entropy of I- for the perception mask."""
        full = self.divergence == "full_kl"
        return [
            ViewRequest(PRESERVING, with_grad=True, divergence=full),
            ViewRequest(REMOVING, with_grad=True, entropy=self.perception_mask, divergence=full),
        ]

    def view_rows(self, advantages: Tensor) -> Tensor:
        """Rows with ``A > 0`` under advantage gating, else every row."""
        if self.advantage_gating:
            return advantages.detach() > 0
        return torch.ones_like(advantages, dtype=torch.bool)

    def select_tokens(self, inputs: ObjectiveInputs) -> TokenSelection:
        """The perception mask ``M`` (from ``H^I`` and ``H^{I-}``), its metrics and diagnostics."""
        counts = self.counts(inputs)
        response = inputs.response_mask.bool()
        view_rows = self.view_rows(inputs.advantages)
        view_tokens = response & view_rows.unsqueeze(-1)
        metrics: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        given = (inputs.selected or {}).get(self.SELECTION)
        if self.perception_mask:
            if inputs.entropy is None:
                raise ValueError("CPPO with perception_mask=True needs ObjectiveInputs.entropy (under I)")
            removing = self._view(inputs, REMOVING, "entropy")
            entropy, entropy_removed = inputs.entropy.detach(), removing.entropy.detach()
            mask = (
                given
                if given is not None
                else perception_token_mask(
                    entropy,
                    entropy_removed,
                    response,
                    top_ratio=self.top_ratio,
                    advantages=inputs.advantages if self.advantage_gating else None,
                )
            )
            metrics["entropy"] = token_mean(entropy, response, counts)
            metrics["entropy_shift"] = token_mean(
                entropy_removed - entropy, view_tokens, counts, "view:removing"
            )
            diagnostics["entropy"] = entropy.float()
            diagnostics["entropy_removed"] = torch.where(
                removing.rows.unsqueeze(-1), entropy_removed.float(), float("nan")
            )
        else:
            mask = given if given is not None else view_tokens
        diagnostics["perception_mask"] = mask
        metrics["perception_fraction"] = token_mean(mask.float(), response, counts)
        if self.advantage_gating:
            gated = (inputs.advantages.detach() <= 0).float()
            metrics["gated_fraction"] = counts.share(gated.sum(), "rows", gated.numel())
        else:
            metrics["gated_fraction"] = torch.zeros((), device=inputs.logprobs.device)
        return TokenSelection(masks={self.SELECTION: mask}, metrics=metrics, diagnostics=diagnostics)

    def auxiliary_loss(
        self, inputs: ObjectiveInputs, counts: BatchCounts
    ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """``cpl_weight * L_CPL``, the perception metrics and the perception diagnostics."""
        selection = self.select_tokens(inputs)
        mask = selection.masks[self.SELECTION]
        if self.divergence == "k3":
            preserving = self._view(inputs, PRESERVING)
            removing = self._view(inputs, REMOVING)
            cpl, metrics = contrastive_perception_loss(
                inputs.logprobs,
                preserving.logprobs,
                removing.logprobs,
                mask,
                tau=self.tau,
                counts=counts,
                count_key=self.SELECTION,
            )
        else:
            cpl, metrics = contrastive_perception_loss_from_divergences(
                self._view(inputs, PRESERVING, "divergence").divergence,
                self._view(inputs, REMOVING, "divergence").divergence,
                mask,
                tau=self.tau,
                counts=counts,
                count_key=self.SELECTION,
            )
        metrics.update(selection.metrics)
        return self.cpl_weight * cpl, metrics, dict(selection.diagnostics)


@dataclass
class PAPO(GRPO):
    """PAPO baseline: GRPO plus the implicit perception loss and optional double entropy.

    ``L = L_PG + beta * L_KL - gamma * tokenmean k3(lp^I, sg[lp^{Imask}])
    + eta_original * H_I + eta_masked * H_Imask``, with the sampled-token NLL as entropy
    estimate. By default the masked-view log-probs come from the pre-update policy under
    no_grad (as in the release), so ``eta_masked`` has no gradient; ``recompute_with_grad``
    computes them in the update forward with gradient instead.

    Logged metrics:
        - ``loss``, ``policy_loss``, ``kl``, ``clip_fraction``, ``dual_clip_fraction``,
          ``ratio_mean``, ``entropy``: see ``Objective``.
        - ``implicit_perception_loss``: ``-tokenmean k3(lp^I, lp^{Imask})`` (before ``gamma``).
        - ``double_entropy``: the weighted double entropy term (when either weight is > 0).

    Args (besides those of :class:`Objective`):
        perception_weight: ``gamma``, weight of the implicit perception loss.
        entropy_weight_original: ``eta1``, weight of the entropy under the original image
            (PAPO: 0.05 for 7B, 0 for 3B).
        entropy_weight_masked: ``eta2``, weight of the entropy under the masked image.
        recompute_with_grad: Compute the masked-view log-probs in the update forward with
            gradient instead of once before the update without.
    """

    perception_weight: float = 0.02
    entropy_weight_original: float = 0.0
    entropy_weight_masked: float = 0.0
    recompute_with_grad: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.perception_weight >= 0, f"perception_weight must be >= 0, got {self.perception_weight}")
        for name in ("entropy_weight_original", "entropy_weight_masked"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")

    def view_requests(self) -> list[ViewRequest]:
        """The patch-blackened view, with gradient only if ``recompute_with_grad``."""
        return [ViewRequest(MASKED, with_grad=self.recompute_with_grad)]

    def view_rows(self, advantages: Tensor) -> Tensor:
        """Every row."""
        return torch.ones_like(advantages, dtype=torch.bool)

    def auxiliary_loss(
        self, inputs: ObjectiveInputs, counts: BatchCounts
    ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """``-gamma * KL_prcp + eta1 * H_I + eta2 * H_Imask`` and their metrics."""
        logprobs = inputs.logprobs
        response = inputs.response_mask.bool()
        masked_logprobs = self._view(inputs, MASKED).logprobs
        if not self.recompute_with_grad:
            masked_logprobs = masked_logprobs.detach()
        loss, metrics = implicit_perception_loss(
            logprobs, masked_logprobs, response, self.aggregation, counts
        )
        loss = self.perception_weight * loss
        if self.entropy_weight_original > 0 or self.entropy_weight_masked > 0:
            entropy_loss, entropy_metrics = double_entropy_loss(
                logprobs,
                masked_logprobs,
                response,
                self.entropy_weight_original,
                self.entropy_weight_masked,
                counts,
            )
            loss = loss + entropy_loss
            metrics.update(entropy_metrics)
        return loss, metrics, {}
