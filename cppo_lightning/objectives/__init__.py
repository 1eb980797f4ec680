"""Losses of GRPO, CPPO and PAPO: pure tensor functions and the Objective classes that compose them."""

from cppo_lightning.objectives.functional import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    DIVERGENCES,
    ROLLOUT_CORRECTIONS,
    BatchCounts,
    NonFiniteError,
    check_finite,
    check_same_shape,
    clipped_policy_loss,
    contrastive_perception_loss,
    contrastive_perception_loss_from_divergences,
    double_entropy_loss,
    full_kl,
    group_advantages,
    implicit_perception_loss,
    k3_kl,
    log_softmax_at,
    masked_aggregate,
    perception_token_mask,
    rollout_correction_weights,
    softmax_entropy,
    token_entropy,
    token_logprobs,
    token_mean,
)
from cppo_lightning.objectives.objectives import (
    CPPO,
    GRPO,
    MASKED,
    PAPO,
    PRESERVING,
    REMOVING,
    Objective,
    ObjectiveInputs,
    ObjectiveOutput,
    Requirements,
    TokenSelection,
    ViewRequest,
    ViewScores,
)

__all__ = [
    "ADVANTAGE_SCALES",
    "AGGREGATIONS",
    "DIVERGENCES",
    "ROLLOUT_CORRECTIONS",
    "BatchCounts",
    "NonFiniteError",
    "check_finite",
    "check_same_shape",
    "clipped_policy_loss",
    "contrastive_perception_loss",
    "contrastive_perception_loss_from_divergences",
    "double_entropy_loss",
    "full_kl",
    "group_advantages",
    "implicit_perception_loss",
    "k3_kl",
    "rollout_correction_weights",
    "log_softmax_at",
    "masked_aggregate",
    "perception_token_mask",
    "softmax_entropy",
    "token_entropy",
    "token_logprobs",
    "token_mean",
    "CPPO",
    "GRPO",
    "MASKED",
    "PAPO",
    "PRESERVING",
    "REMOVING",
    "Objective",
    "Requirements",
    "ObjectiveInputs",
    "ObjectiveOutput",
    "TokenSelection",
    "ViewRequest",
    "ViewScores",
]


_REGISTRY = {"grpo": GRPO, "cppo": CPPO, "papo": PAPO}


def _build_objective(name: str, **kwargs):
    if name.lower() not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name.lower()](**kwargs)


def __getattr__(name: str):
    # Removed in 0.3 (nothing used them: YAML names the class), importable for one version.
    if name in ("OBJECTIVES", "build_objective"):
        import warnings

        warnings.warn(
            f"cppo_lightning.objectives.{name} is deprecated and goes in the next version: name the class "
            "(GRPO, CPPO, PAPO) or use Objective.from_config",
            DeprecationWarning,
            stacklevel=2,
        )
        return dict(_REGISTRY) if name == "OBJECTIVES" else _build_objective
    raise AttributeError(f"module 'cppo_lightning.objectives' has no attribute {name!r}")
