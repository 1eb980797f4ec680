"""Objective classes: GRPO, CPPO and PAPO composed from the functions in ``functional``.

An objective tells the training module what it needs (reference log-probs, entropies, which
perturbed image views, for which rows) and turns those tensors into ``(loss, metrics)``. It is
chosen in YAML by ``class_path: cppo_lightning.objectives.CPPO``; constructor arguments are the
hyperparameters, with the defaults of the CPPO paper (arXiv 2601.00501) and its reference release.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cppo_lightning.batch import MASKED, PRESERVING, REMOVING
from cppo_lightning.objectives.functional import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    DIVERGENCES,
    check_finite,
    clipped_policy_loss,
    contrastive_perception_loss,
    double_entropy_loss,
    implicit_perception_loss,
    k3_kl,
    masked_aggregate,
    perception_token_mask,
)

__all__ = [
    "PRESERVING",
    "REMOVING",
    "MASKED",
    "ViewRequest",
    "ViewOutputs",
    "ObjectiveInputs",
    "Objective",
    "GRPO",
    "CPPO",
    "PAPO",
    "OBJECTIVES",
    "build_objective",
]


@dataclass
class ViewRequest:
    """What an objective needs from one perturbed image view.

    Args:
        name: ``"preserving"`` (I+), ``"removing"`` (I-) or ``"masked"`` (PAPO).
        with_grad: True: computed in the update forward with gradient. False: computed once
            before the update under no_grad with the pre-update policy.
        entropy: The full-vocabulary entropy under this view is needed.
        full_distribution: The full log-distribution under this view is needed.
    """

    name: str
    with_grad: bool
    entropy: bool = False
    full_distribution: bool = False


@dataclass
class ViewOutputs:
    """The policy's outputs on one perturbed view, for a subset of the micro-batch rows.

    Args:
        rows: long [R'] indices into the R rows of the micro-batch (unique).
        logprobs: [R', T] sampled-token log-probs under the view.
        entropy: [R', T] full-vocab entropy under the view, if requested.
        log_distribution: [R', T, V] log-distribution under the view, if requested.
    """

    rows: Tensor
    logprobs: Tensor
    entropy: Tensor | None = None
    log_distribution: Tensor | None = None


@dataclass
class ObjectiveInputs:
    """Everything an objective reads for one micro-batch.

    Args:
        logprobs: [R, T] ``lp^I`` under the current policy, with gradient.
        response_mask: [R, T] bool, True on response (non-padding) tokens.
        advantages: [R] one advantage per rollout.
        old_logprobs: [R, T] rollout-policy log-probs; None means ``lp_old = lp.detach()``
            (one optimizer step per rollout batch).
        ref_logprobs: [R, T] reference-policy log-probs; present iff ``needs_reference``.
        entropy: [R, T] full-vocab entropy under ``I`` (no gradient).
        log_distribution: [R, T, V] log-distribution under ``I``, with gradient.
        views: Outputs on the perturbed views, keyed by ``ViewRequest.name``.
    """

    logprobs: Tensor
    response_mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    entropy: Tensor | None = None
    log_distribution: Tensor | None = None
    views: dict[str, ViewOutputs] = field(default_factory=dict)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_rows_tensor(name: str, shape: tuple[int, ...], tensor: Tensor, what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {what} {shape}")


def _scatter_rows(base: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    """``base`` with ``base[rows] = values``, out of place; gradient flows into ``values``.

    Always going through the full [R, T] tensor (also when ``rows`` covers every row) keeps
    every later elementwise op on identically laid-out data, which makes the row-subset path
    bitwise equal to the all-rows path.
    """
    return torch.index_put(base, (rows,), values.to(base.dtype))


class Objective:
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
        - ``entropy``: mean full-vocab entropy under ``I`` (when the module supplies it).

    Args:
        beta: Weight of the k3 KL to the reference policy; 0 skips the reference forward.
        eps_low: Lower clip range of the importance ratio (``rho >= 1 - eps_low``).
        eps_high: Upper clip range of the importance ratio (``rho <= 1 + eps_high``).
        dual_clip: Dual-clip constant (> 1) bounding the loss of tokens with negative
            advantage; None disables it.
        aggregation: How per-token losses are reduced: ``"token-mean"``,
            ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum"`` (Dr. GRPO).
        advantage_scale: ``"std"`` (GRPO) or ``"none"`` (Dr. GRPO, no division by the group
            std); read by the training module when it computes advantages.
    """

    def __init__(
        self,
        beta: float = 0.01,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: float | None = 3.0,
        aggregation: str = "token-mean",
        advantage_scale: str = "std",
    ) -> None:
        _require(beta >= 0, f"beta must be >= 0, got {beta}")
        _require(0 <= eps_low < 1, f"eps_low must be in [0, 1), got {eps_low}")
        _require(eps_high >= 0, f"eps_high must be >= 0, got {eps_high}")
        _require(dual_clip is None or dual_clip > 1, f"dual_clip must be > 1 or None, got {dual_clip}")
        _require(
            aggregation in AGGREGATIONS,
            f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}",
        )
        _require(
            advantage_scale in ADVANTAGE_SCALES,
            f"unknown advantage_scale {advantage_scale!r}; expected one of {', '.join(ADVANTAGE_SCALES)}",
        )
        self.beta = beta
        self.eps_low = eps_low
        self.eps_high = eps_high
        self.dual_clip = dual_clip
        self.aggregation = aggregation
        self.advantage_scale = advantage_scale

    # ---- what the training module must compute -------------------------------------------

    @property
    def needs_reference(self) -> bool:
        """Reference-policy log-probs are needed (``beta > 0``)."""
        return self.beta > 0

    @property
    def needs_entropy(self) -> bool:
        """The full-vocab entropy under the original image is needed."""
        return False

    @property
    def needs_full_distribution(self) -> bool:
        """Full log-distributions (``ObjectiveInputs.log_distribution``) are needed."""
        return False

    def view_requests(self) -> list[ViewRequest]:
        """The perturbed image views this objective needs (none for GRPO)."""
        return []

    def view_rows(self, advantages: Tensor) -> Tensor:
        """Rows for which the perturbed views must be computed.

        Args:
            advantages (Tensor): [R] advantages of the micro-batch.

        Returns:
            Tensor: [R] bool.
        """
        return torch.zeros_like(advantages, dtype=torch.bool)

    # ---- the loss ---------------------------------------------------------------------------

    def __call__(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch.

        Args:
            inputs: The tensors listed in ``ObjectiveInputs``; the views of ``view_requests``
                for (at least) the rows of ``view_rows``.

        Returns:
            tuple[Tensor, dict[str, Tensor]]: the 0-dim loss to minimise, and detached 0-dim
            metrics (see "Logged metrics").
        """
        self._check_inputs(inputs)
        logprobs = inputs.logprobs
        response = inputs.response_mask.bool()
        old = inputs.old_logprobs if inputs.old_logprobs is not None else logprobs.detach()
        loss, metrics = clipped_policy_loss(
            logprobs,
            old,
            inputs.advantages,
            response,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            dual_clip=self.dual_clip,
            aggregation=self.aggregation,
        )
        metrics["policy_loss"] = loss.detach()
        if inputs.ref_logprobs is not None:
            kl = masked_aggregate(k3_kl(logprobs, inputs.ref_logprobs.detach()), response, self.aggregation)
            metrics["kl"] = kl.detach()
            if self.beta > 0:
                loss = loss + self.beta * kl
        if inputs.entropy is not None:
            metrics["entropy"] = masked_aggregate(inputs.entropy.detach().float(), response)
        extra, extra_metrics = self.auxiliary_loss(inputs)
        if extra is not None:
            loss = loss + extra
        metrics.update(extra_metrics)
        metrics["loss"] = loss.detach()
        return loss, metrics

    def auxiliary_loss(self, inputs: ObjectiveInputs) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Terms a subclass adds to ``L_PG + beta * L_KL`` (already weighted), and their metrics."""
        return None, {}

    # ---- input checks -----------------------------------------------------------------------

    def _check_inputs(self, inputs: ObjectiveInputs) -> None:
        logprobs = inputs.logprobs
        _require(logprobs.dim() == 2, f"logprobs must be [R, T], got shape {tuple(logprobs.shape)}")
        shape = tuple(logprobs.shape)
        _check_rows_tensor("response_mask", shape, inputs.response_mask, "logprobs has shape")
        _check_rows_tensor("advantages", shape[:1], inputs.advantages, "expected [R] =")
        for name in ("old_logprobs", "ref_logprobs", "entropy"):
            tensor = getattr(inputs, name)
            if tensor is not None:
                _check_rows_tensor(name, shape, tensor, "logprobs has shape")
                check_finite(name, tensor)
        check_finite("logprobs", logprobs)
        check_finite("advantages", inputs.advantages)
        if self.needs_reference and inputs.ref_logprobs is None:
            raise ValueError(
                f"{type(self).__name__} with beta={self.beta} needs ObjectiveInputs.ref_logprobs"
            )
        if self.needs_entropy and inputs.entropy is None:
            raise ValueError(f"{type(self).__name__} needs ObjectiveInputs.entropy (entropy under I)")
        if self.needs_full_distribution and inputs.log_distribution is None:
            raise ValueError(f"{type(self).__name__} needs ObjectiveInputs.log_distribution")

    def _view(self, inputs: ObjectiveInputs, name: str, required: Tensor) -> ViewOutputs:
        """The named view, checked: unique in-range rows covering every required row."""
        if name not in inputs.views:
            raise ValueError(
                f"{type(self).__name__} needs the {name!r} view but ObjectiveInputs.views has "
                f"{sorted(inputs.views)}"
            )
        view = inputs.views[name]
        num_rows, length = inputs.logprobs.shape
        rows = view.rows
        _require(
            rows.dim() == 1 and not rows.is_floating_point() and rows.dtype != torch.bool,
            f"views[{name!r}].rows must be integer row indices [R'], got {rows.dtype} {tuple(rows.shape)}",
        )
        _check_rows_tensor(
            f"views[{name!r}].logprobs", (rows.numel(), length), view.logprobs, "expected [len(rows), T] ="
        )
        check_finite(f"views[{name!r}].logprobs", view.logprobs)
        if view.entropy is not None:
            _check_rows_tensor(
                f"views[{name!r}].entropy", (rows.numel(), length), view.entropy, "expected [len(rows), T] ="
            )
            check_finite(f"views[{name!r}].entropy", view.entropy)
        if rows.numel():
            _require(
                int(rows.min()) >= 0 and int(rows.max()) < num_rows,
                f"views[{name!r}].rows must be in [0, {num_rows}), got {rows.tolist()}",
            )
            _require(rows.unique().numel() == rows.numel(), f"views[{name!r}].rows has duplicates")
        covered = torch.zeros(num_rows, dtype=torch.bool, device=required.device)
        covered[rows.to(required.device)] = True
        missing = required & ~covered
        if bool(missing.any()):
            raise ValueError(
                f"views[{name!r}] lacks rows {missing.nonzero().flatten().tolist()} that "
                f"{type(self).__name__}.view_rows requires"
            )
        return view

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: plain data that rebuilds this objective."""
        cls = type(self)
        names: list[str] = []
        # A subclass forwarding **kwargs to its parent: the parent's parameters count too.
        for klass in cls.__mro__:
            if "__init__" not in vars(klass) or not issubclass(klass, Objective):
                continue
            parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
            names += [
                p.name
                for p in parameters
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names
            ]
            if not any(p.kind == p.VAR_KEYWORD for p in parameters):
                break
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {n: getattr(self, n) for n in names},
        }

    @staticmethod
    def from_config(config: dict[str, Any]) -> Objective:
        """Rebuild an objective from :meth:`config` output (or the same YAML form).

        Raises:
            ValueError: the class path does not name an :class:`Objective`.
        """
        import importlib

        module_name, _, name = config["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), name, None)
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise ValueError(f"{config['class_path']!r} is not an Objective class")
        return cls(**config.get("init_args", {}))

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in self.config()["init_args"].items())
        return f"{type(self).__name__}({args})"


class GRPO(Objective):
    """GRPO: ``L = L_PG + beta * L_KL``; no perturbed views.

    Logged metrics:
        - ``loss``, ``policy_loss``, ``kl``, ``clip_fraction``, ``dual_clip_fraction``,
          ``ratio_mean``, ``entropy``: see ``Objective``.

    Args:
        beta: Weight of the k3 KL to the reference policy; 0 skips the reference forward.
        eps_low: Lower clip range of the importance ratio (``rho >= 1 - eps_low``).
        eps_high: Upper clip range of the importance ratio (``rho <= 1 + eps_high``).
        dual_clip: Dual-clip constant (> 1) bounding the loss of tokens with negative
            advantage; None disables it.
        aggregation: How per-token losses are reduced: ``"token-mean"``,
            ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum"`` (Dr. GRPO).
        advantage_scale: ``"std"`` (GRPO) or ``"none"`` (Dr. GRPO, no division by the group
            std); read by the training module when it computes advantages.
    """


class CPPO(GRPO):
    """CPPO: GRPO plus the Contrastive Perception Loss on perception tokens.

    ``L = L_PG + beta * L_KL + cpl_weight * L_CPL``. Perception tokens are the top
    ``top_ratio`` response tokens of each row by relative entropy rise under the
    information-removing view; with advantage gating only rows with ``A > 0`` take part. The
    views are requested only for ``view_rows`` (the ``A > 0`` rows under gating): every other
    row has ``M = 0``, so the loss and its gradients are exactly those of computing the views
    for every row, as in the release (bitwise so for ``divergence="k3"``).

    Logged metrics:
        - ``loss``, ``policy_loss``, ``kl``, ``clip_fraction``, ``dual_clip_fraction``,
          ``ratio_mean``, ``entropy``: see ``Objective``.
        - ``cpl``: mean contrastive perception loss over the perception tokens.
        - ``divergence_preserving``: mean ``D+`` over the perception tokens.
        - ``divergence_removing``: mean ``D-`` over the perception tokens.
        - ``perception_fraction``: perception tokens / response tokens of the micro-batch.
        - ``gated_fraction``: fraction of rows removed by advantage gating (``A <= 0``);
          0 without gating.
        - ``entropy_shift``: mean ``H^{I-} - H^I`` over the response tokens of the view rows
          (when entropies are available).

    Args:
        beta: Weight of the k3 KL to the reference policy; 0 skips the reference forward.
        eps_low: Lower clip range of the importance ratio (``rho >= 1 - eps_low``).
        eps_high: Upper clip range of the importance ratio (``rho <= 1 + eps_high``).
        dual_clip: Dual-clip constant (> 1) bounding the loss of tokens with negative
            advantage; None disables it.
        aggregation: How per-token losses are reduced: ``"token-mean"``,
            ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum"`` (Dr. GRPO).
        advantage_scale: ``"std"`` (GRPO) or ``"none"`` (Dr. GRPO, no division by the group
            std); read by the training module when it computes advantages.
        cpl_weight: ``lambda``, weight of the Contrastive Perception Loss (release: 0.01).
        tau: Temperature of the CPL softplus, positive.
        top_ratio: ``rho`` in (0, 1], fraction of each row's eligible tokens kept as
            perception tokens.
        perception_mask: Select perception tokens by entropy shift; False applies the CPL to
            every response token (ablation).
        advantage_gating: Apply the CPL only to rows with ``A > 0``; False applies it to every
            row (ablation; then the views are computed for every row).
        divergence: ``"k3"`` (sampled-token estimate, release) or ``"full_kl"`` (exact
            full-vocabulary KL, ablation; needs full log-distributions).
    """

    def __init__(
        self,
        beta: float = 0.01,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: float | None = 3.0,
        aggregation: str = "token-mean",
        advantage_scale: str = "std",
        cpl_weight: float = 0.01,
        tau: float = 0.1,
        top_ratio: float = 0.5,
        perception_mask: bool = True,
        advantage_gating: bool = True,
        divergence: str = "k3",
    ) -> None:
        super().__init__(beta, eps_low, eps_high, dual_clip, aggregation, advantage_scale)
        _require(cpl_weight >= 0, f"cpl_weight must be >= 0, got {cpl_weight}")
        _require(tau > 0, f"tau must be positive, got {tau}")
        _require(0 < top_ratio <= 1, f"top_ratio must be in (0, 1], got {top_ratio}")
        _require(
            divergence in DIVERGENCES,
            f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}",
        )
        self.cpl_weight = cpl_weight
        self.tau = tau
        self.top_ratio = top_ratio
        self.perception_mask = perception_mask
        self.advantage_gating = advantage_gating
        self.divergence = divergence

    @property
    def needs_entropy(self) -> bool:
        """Entropy under ``I`` is needed to find perception tokens."""
        return self.perception_mask

    @property
    def needs_full_distribution(self) -> bool:
        """Full log-distributions are needed for the full-KL ablation."""
        return self.divergence == "full_kl"

    def view_requests(self) -> list[ViewRequest]:
        """I+ and I-, both with gradient; entropy of I- for the perception mask."""
        full = self.needs_full_distribution
        return [
            ViewRequest(PRESERVING, with_grad=True, full_distribution=full),
            ViewRequest(REMOVING, with_grad=True, entropy=self.perception_mask, full_distribution=full),
        ]

    def view_rows(self, advantages: Tensor) -> Tensor:
        """Rows with ``A > 0`` under advantage gating, else every row."""
        if self.advantage_gating:
            return advantages.detach() > 0
        return torch.ones_like(advantages, dtype=torch.bool)

    def auxiliary_loss(self, inputs: ObjectiveInputs) -> tuple[Tensor | None, dict[str, Tensor]]:
        """``cpl_weight * L_CPL`` and the perception metrics."""
        logprobs = inputs.logprobs
        response = inputs.response_mask.bool()
        required = self.view_rows(inputs.advantages)
        preserving = self._view(inputs, PRESERVING, required)
        removing = self._view(inputs, REMOVING, required)
        metrics: dict[str, Tensor] = {}

        if self.perception_mask:
            if removing.entropy is None:
                raise ValueError("CPPO with perception_mask=True needs views['removing'].entropy")
            entropy = inputs.entropy.detach()
            # Rows without an I- forward get H^{I-} = H^I: no entropy rise, nothing eligible.
            entropy_removed = _scatter_rows(entropy, removing.rows, removing.entropy.detach())
            mask = perception_token_mask(
                entropy,
                entropy_removed,
                response,
                top_ratio=self.top_ratio,
                advantages=inputs.advantages if self.advantage_gating else None,
            )
            view_tokens = response & required.unsqueeze(-1)
            metrics["entropy_shift"] = masked_aggregate((entropy_removed - entropy).float(), view_tokens)
        else:
            mask = response & required.unsqueeze(-1)

        if self.divergence == "k3":
            # Rows without views get lp^{I+} = lp^{I-} = lp^I (D = 0); M is 0 there anyway.
            placeholder = logprobs.detach()
            cpl, cpl_metrics = contrastive_perception_loss(
                logprobs,
                _scatter_rows(placeholder, preserving.rows, preserving.logprobs),
                _scatter_rows(placeholder, removing.rows, removing.logprobs),
                mask,
                tau=self.tau,
            )
        else:
            cpl, cpl_metrics = self._full_kl_cpl(inputs, preserving, removing, mask)
        metrics.update(cpl_metrics)

        response_count = response.sum().clamp(min=1)
        metrics["perception_fraction"] = (mask.sum() / response_count).float()
        gated = (inputs.advantages.detach() <= 0).float().mean() if self.advantage_gating else 0.0
        metrics["gated_fraction"] = torch.as_tensor(gated, dtype=torch.float32, device=logprobs.device)
        return self.cpl_weight * cpl, metrics

    def _full_kl_cpl(
        self, inputs: ObjectiveInputs, preserving: ViewOutputs, removing: ViewOutputs, mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """CPL with exact KLs, on the view rows only (M is 0 elsewhere, so the sums agree)."""
        _require(
            torch.equal(preserving.rows.cpu(), removing.rows.cpu()),
            "divergence='full_kl' needs the 'preserving' and 'removing' views on the same rows",
        )
        for name, view in ((PRESERVING, preserving), (REMOVING, removing)):
            _require(
                view.log_distribution is not None,
                f"divergence='full_kl' needs views[{name!r}].log_distribution",
            )
        rows = preserving.rows.to(inputs.logprobs.device)
        return contrastive_perception_loss(
            inputs.log_distribution[rows],
            preserving.log_distribution,
            removing.log_distribution,
            mask[rows],
            tau=self.tau,
            divergence="full_kl",
        )


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

    Args:
        beta: Weight of the k3 KL to the reference policy; 0 skips the reference forward.
        eps_low: Lower clip range of the importance ratio (``rho >= 1 - eps_low``).
        eps_high: Upper clip range of the importance ratio (``rho <= 1 + eps_high``).
        dual_clip: Dual-clip constant (> 1) bounding the loss of tokens with negative
            advantage; None disables it.
        aggregation: How per-token losses are reduced: ``"token-mean"``,
            ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum"`` (Dr. GRPO).
        advantage_scale: ``"std"`` (GRPO) or ``"none"`` (Dr. GRPO, no division by the group
            std); read by the training module when it computes advantages.
        perception_weight: ``gamma``, weight of the implicit perception loss.
        entropy_weight_original: ``eta1``, weight of the entropy under the original image
            (PAPO: 0.05 for 7B, 0 for 3B).
        entropy_weight_masked: ``eta2``, weight of the entropy under the masked image.
        recompute_with_grad: Compute the masked-view log-probs in the update forward with
            gradient instead of once before the update without.
    """

    def __init__(
        self,
        beta: float = 0.01,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: float | None = 3.0,
        aggregation: str = "token-mean",
        advantage_scale: str = "std",
        perception_weight: float = 0.02,
        entropy_weight_original: float = 0.0,
        entropy_weight_masked: float = 0.0,
        recompute_with_grad: bool = False,
    ) -> None:
        super().__init__(beta, eps_low, eps_high, dual_clip, aggregation, advantage_scale)
        _require(perception_weight >= 0, f"perception_weight must be >= 0, got {perception_weight}")
        for name, weight in (
            ("entropy_weight_original", entropy_weight_original),
            ("entropy_weight_masked", entropy_weight_masked),
        ):
            _require(weight >= 0, f"{name} must be >= 0, got {weight}")
        self.perception_weight = perception_weight
        self.entropy_weight_original = entropy_weight_original
        self.entropy_weight_masked = entropy_weight_masked
        self.recompute_with_grad = recompute_with_grad

    def view_requests(self) -> list[ViewRequest]:
        """The patch-blackened view, with gradient only if ``recompute_with_grad``."""
        return [ViewRequest(MASKED, with_grad=self.recompute_with_grad)]

    def view_rows(self, advantages: Tensor) -> Tensor:
        """Every row."""
        return torch.ones_like(advantages, dtype=torch.bool)

    def auxiliary_loss(self, inputs: ObjectiveInputs) -> tuple[Tensor | None, dict[str, Tensor]]:
        """``-gamma * KL_prcp + eta1 * H_I + eta2 * H_Imask`` and their metrics."""
        logprobs = inputs.logprobs
        response = inputs.response_mask.bool()
        masked = self._view(inputs, MASKED, self.view_rows(inputs.advantages))
        masked_logprobs = _scatter_rows(logprobs.detach(), masked.rows, masked.logprobs)
        if not self.recompute_with_grad:
            masked_logprobs = masked_logprobs.detach()
        loss, metrics = implicit_perception_loss(logprobs, masked_logprobs, response, self.aggregation)
        loss = self.perception_weight * loss
        if self.entropy_weight_original > 0 or self.entropy_weight_masked > 0:
            entropy_loss, entropy_metrics = double_entropy_loss(
                logprobs, masked_logprobs, response, self.entropy_weight_original, self.entropy_weight_masked
            )
            loss = loss + entropy_loss
            metrics.update(entropy_metrics)
        return loss, metrics


OBJECTIVES: dict[str, type[Objective]] = {"grpo": GRPO, "cppo": CPPO, "papo": PAPO}


def build_objective(name: str, **kwargs: Any) -> Objective:
    """Build an objective by registry name.

    Args:
        name: ``"grpo"``, ``"cppo"`` or ``"papo"`` (case-insensitive).
        **kwargs: Constructor arguments of that objective.

    Returns:
        Objective: the configured objective.
    """
    key = name.lower()
    if key not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[key](**kwargs)
