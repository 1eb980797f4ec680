"""cppo-lightning: CPPO, GRPO and PAPO fine-tuning of vision-language models on PyTorch Lightning.

    from cppo_lightning import CPPOModule, PolicyConfig, PromptBatch
    from cppo_lightning.objectives import CPPO, GRPO, PAPO

Names are imported lazily, so ``import cppo_lightning.objectives`` stays a pure-torch import.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CPPOModule": "cppo_lightning.module",
    "EvaluationConfig": "cppo_lightning.sampling",
    "UpdateConfig": "cppo_lightning.module",
    "RolloutConfig": "cppo_lightning.sampling",
    "Rollout": "cppo_lightning.rollout",
    "PolicyConfig": "cppo_lightning.models.loading",
    "LoRAConfig": "cppo_lightning.models.loading",
    "load_policy": "cppo_lightning.models.loading",
    "PromptBatch": "cppo_lightning.batch",
    "EncodedPrompt": "cppo_lightning.batch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cppo_lightning' has no attribute {name!r}")
