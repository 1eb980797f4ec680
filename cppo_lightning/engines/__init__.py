"""Rollout engines: what samples the completions of a training or evaluation step.

- :class:`HFEngine` (``model.rollout.engine: hf``, the default): ``generate`` on the trained policy.
- :class:`VLLMEngine` (``model.rollout.engine: vllm``): vLLM colocated in the training process, synced
  after every optimizer step (needs the ``[vllm]`` extra).

The module sees only the :class:`RolloutEngine` protocol. Implementations are imported lazily, so
``import cppo_lightning.engines`` never imports vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING

from cppo_lightning.engines.base import Generation, RolloutEngine, sampler_kl, sampler_logprob_mismatch
from cppo_lightning.engines.config import VLLMConfig

if TYPE_CHECKING:
    from cppo_lightning.models.loading import Policy
    from cppo_lightning.sampling import RolloutConfig

ENGINES = ("hf", "vllm")

_LAZY = {"HFEngine": "cppo_lightning.engines.hf", "VLLMEngine": "cppo_lightning.engines.vllm"}


def build_engine(
    rollout: RolloutConfig,
    policy: Policy,
    synced_gpus: bool | Callable[[], bool] = False,
    report_logprobs: bool = False,
) -> RolloutEngine:
    """The engine ``rollout.engine`` names, for this policy.

    Args:
        rollout: the rollout settings (``engine`` and its options).
        policy: the loaded policy.
        synced_gpus: for the HF engine under sharded strategies (see :class:`HFEngine`).
        report_logprobs: the sampler's log-probs are needed (vLLM always reports them; HF on request).

    Raises:
        ValueError: an unknown engine name, or an engine that cannot serve this policy.
        ImportError: ``vllm`` without vLLM installed (the message names the extra).
    """
    if rollout.engine == "hf":
        from cppo_lightning.engines.hf import HFEngine

        return HFEngine(synced_gpus=synced_gpus, report_logprobs=report_logprobs)
    if rollout.engine == "vllm":
        from cppo_lightning.engines.vllm import VLLMEngine

        return VLLMEngine(policy, rollout.vllm, rollout)
    raise ValueError(f"model.rollout.engine must be one of {ENGINES}, got {rollout.engine!r}")


def check_sampler_logprobs(engine: RolloutEngine, name: str, settings: list[str]) -> None:
    """Refuse, at start-up, an engine that reports no log-probs when the update needs them.

    Args:
        engine: the built engine.
        name: ``model.rollout.engine``.
        settings: the settings that need the sampler's log-probs (empty: nothing is checked).

    Raises:
        ValueError: naming the engine and those settings.
    """
    if settings and not getattr(engine, "reports_logprobs", False):
        raise ValueError(
            f"{' and '.join(settings)} need the sampler's log-probs, and the rollout engine {name!r} "
            f"({type(engine).__name__}) reports none"
        )


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cppo_lightning.engines' has no attribute {name!r}")


__all__ = [
    "ENGINES",
    "Generation",
    "HFEngine",
    "RolloutEngine",
    "VLLMConfig",
    "VLLMEngine",
    "build_engine",
    "check_sampler_logprobs",
    "sampler_kl",
    "sampler_logprob_mismatch",
]
