"""FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning's ``ModelParallelStrategy``.

Lightning's ``ModelParallelStrategy`` does not wrap the model: :meth:`CPPOModule.configure_model` calls
:func:`shard_network` on the policy (and on the reference copy), which shards every decoder layer and every vision block (the architecture table
names them) as its own unit, then the rest of the network (embeddings, final norm, output head, vision
patch embedding and merger) as one root unit. The frozen reference copy of full fine-tuning is sharded
the same way.

The root unit is a small wrapper, :class:`ShardedRoot`, around the network rather than the network
itself: the update calls the backbone and the output head separately (the head chunk by chunk, see
``models/scoring.py``) and ``generate`` calls the network's forward many times, so the parameters the root
unit holds must be gathered around *our* call, not around one ``forward``. :func:`run_gathered` runs a
function inside the wrapper's forward: FSDP2 gathers the root unit once (the output head's weight once per
scoring forward, however many chunks; once per ``generate`` call), the layers gather themselves as they
run, and the backward reduce-scatters every gradient into its shard.

Whatever reads whole parameters goes through here: the global gradient norm and clipping over all shards
(:func:`global_grad_norm`, :func:`clip_by_global_norm`) and the full weights for export and the vLLM sync
(:func:`full_state_dict`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from cppo_lightning.architectures import architecture_of

#: What a user of Lightning's FSDP1 strategy is told (checked by the CLI before the trainer exists, and by
#: ``CPPOModule.configure_model`` for Python users).
FSDP1_MESSAGE = (
    "lightning.pytorch.strategies.FSDPStrategy (FSDP1) is not supported: with manual optimization it fails "
    "when several forwards run before one backward, which every RL update here does (reference, old policy, "
    "the stacked views; Lightning issues 19626/19685), and it cannot run on a CPU, so it cannot be tested. "
    "Use FSDP2 through ModelParallelStrategy instead, e.g. configs/qwen2_5_vl_7b/full_cppo_fsdp.yaml:\n"
    "  strategy:\n"
    "    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
    "    init_args:\n"
    "      data_parallel_size: 8  # the number of GPUs\n"
    "      tensor_parallel_size: 1"
)


def is_fsdp1(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's FSDP1 strategy (an instance, a class, or a class path string)."""
    if isinstance(strategy, str):
        return strategy == "fsdp" or strategy.startswith("fsdp_") or strategy.endswith("FSDPStrategy")
    cls = strategy if isinstance(strategy, type) else type(strategy)
    return any(base.__name__ == "FSDPStrategy" for base in cls.__mro__)


def is_model_parallel(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 applied by the module)."""
    cls = type(strategy)
    return any(base.__name__ == "ModelParallelStrategy" for base in cls.__mro__)


def check_strategy(strategy: Any, finetuning: str) -> None:
    """Refuse the strategy/fine-tuning combinations that cannot work, before anything is loaded.

    Raises:
        ValueError: FSDP1; QLoRA under FSDP2; tensor parallelism (``tensor_parallel_size`` > 1).
    """
    if is_fsdp1(strategy):
        raise ValueError(FSDP1_MESSAGE)
    if not is_model_parallel(strategy):
        return
    if finetuning == "qlora":
        raise ValueError(
            "QLoRA under ModelParallelStrategy (FSDP2) is not supported: bitsandbytes' 4-bit weights cannot be "
            "sharded into DTensors. QLoRA keeps one 4-bit copy per GPU: use strategy: ddp (e.g. "
            "configs/qwen2_5_vl_3b/qlora_cppo.yaml with trainer.devices N), or finetuning: lora under FSDP2 "
            "(configs/qwen2_5_vl_7b/lora_cppo_fsdp.yaml)."
        )
    mesh = getattr(strategy, "_device_mesh", None)
    tensor_parallel = (
        mesh["tensor_parallel"].size() if mesh is not None else getattr(strategy, "_tensor_parallel_size", 1)
    )
    if tensor_parallel != 1:
        raise ValueError(
            f"ModelParallelStrategy with tensor_parallel_size {tensor_parallel}: tensor parallelism is not "
            "supported (only FSDP2 data parallelism is). Lightning's default 'auto' means tensor parallelism "
            "across a node's devices: set data_parallel_size: <number of GPUs> and tensor_parallel_size: 1."
        )


# ---------------------------------------------------------------------------------------------- sharding


class ShardedRoot(nn.Module):
    """The root FSDP2 unit around a network: its forward runs any function with the root's parameters gathered.

    Not registered in the module tree (the network stays where it is, under its own name), so state dict
    keys do not change.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``; FSDP2's hooks around it gather and release the root's parameters."""
        return function(*args, **kwargs)


_ROOT_ATTRIBUTE = "_cppo_sharded_root"


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units of their own: each decoder layer and each vision block.

    Found by the architecture table's names: ``<language model>.<decoder_layers>.<i>`` and
    ``<vision_blocks>.<i>`` (under a PEFT wrapper too).
    """
    arch = architecture_of(model)
    pattern = re.compile(
        rf".*(?:\.{arch.language_model}\.{arch.decoder_layers}|\.(?:{arch.vision_blocks}))\.\d+"
    )
    return [module for name, module in model.named_modules() if pattern.fullmatch(f".{name}")]


def shard_network(network: nn.Module, mesh: Any, mixed_precision: bool) -> ShardedRoot:
    """``fully_shard`` each layer and vision block of ``network``, then the rest as one root unit.

    Args:
        network: a transformers VLM (or its PEFT wrapper); ``fully_shard`` moves each unit to the mesh's
            device as it shards it.
        mesh: the data-parallel device mesh.
        mixed_precision: bf16 parameters in forward/backward, fp32 gradient reduction (GPUs); False: fp32.

    Returns:
        The root unit (also kept on ``network``, where :func:`run_gathered` finds it).

    Raises:
        ValueError: no layer or block matched the architecture table's names.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = shard_units(network)
    if not units:
        raise ValueError(
            f"FSDP2: no decoder layer or vision block of {type(network).__name__} matches the architecture "
            f"table ({architecture_of(network).name}); add its module names to cppo_lightning/architectures.py"
        )
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, **kwargs)
    # The root reshards after every call too (FSDP2 keeps a root gathered by default): outside
    # run_gathered every parameter is a shard, which is what checkpoints and exports read.
    root = fully_shard(ShardedRoot(network), reshard_after_forward=True, **kwargs)
    object.__setattr__(network, _ROOT_ATTRIBUTE, root)
    return root


def sharded_root(network: nn.Module) -> ShardedRoot | None:
    """The root unit :func:`shard_network` made for ``network`` (None: not sharded)."""
    return network.__dict__.get(_ROOT_ATTRIBUTE)


def run_gathered(network: nn.Module, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` with ``network``'s root unit gathered (a plain call when not sharded).

    Every rank must call it the same number of times (the gathers are collectives).
    """
    root = sharded_root(network)
    if root is None:
        return function(*args, **kwargs)
    with warnings.catch_warnings():
        # The scores are views of dense buffers; nothing modifies them in place (FSDP2 warns for any view).
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        return root(function, *args, **kwargs)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor shard."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


# ---------------------------------------------------------------------------------------------- gradients


def global_grad_norm(parameters: Iterable[nn.Parameter], device: torch.device | None = None) -> Tensor:
    """The L2 norm of all gradients together, over every shard of every rank (one all-reduce if sharded).

    Args:
        parameters: the trained parameters (plain tensors or DTensor shards); those without a gradient
            are skipped.
        device: where the zero of "no gradient at all" goes.

    Returns:
        Tensor: a scalar, the same on every rank.
    """
    from torch.distributed.tensor import DTensor

    gradients = [p.grad for p in parameters if p.grad is not None]
    if not gradients:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm(gradients)
    if isinstance(norm, DTensor):  # each rank holds the norm of its shards: combine them
        norm = norm.full_tensor()
    return norm


def clip_by_global_norm(parameters: Iterable[nn.Parameter], max_norm: float, norm: Tensor) -> None:
    """Scale every gradient by ``min(1, max_norm / norm)`` (``norm`` from :func:`global_grad_norm`)."""
    parameters = [p for p in parameters if p.grad is not None]
    if parameters:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)


# ---------------------------------------------------------------------------------------------- full weights


def full_state_dict(
    module: nn.Module, all_ranks: bool = False, select: Callable[[str], bool] | None = None
) -> dict[str, Tensor]:
    """The whole (unsharded) state dict of ``module``, its names as ``module.state_dict()`` gives them.

    A collective: call it on every rank. Sharded tensors are gathered; plain ones are returned as they are.

    Args:
        module: a network, sharded or not.
        all_ranks: every rank gets the tensors (the vLLM sync: one sampler per rank); False: rank 0 gets
            them on the CPU, the other ranks an empty dict (export).
        select: only the names it accepts (e.g. the LoRA adapters: the frozen base is never gathered).
    """
    from torch.distributed.tensor import DTensor

    state = module.state_dict()
    if select is not None:
        state = {name: value for name, value in state.items() if select(name)}
    if not is_sharded(module):
        return state
    keep = all_ranks or torch.distributed.get_rank() == 0
    full = {}
    for name, value in state.items():  # one gathered tensor alive at a time
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            full[name] = value.detach() if all_ranks else value.detach().cpu()
    return full


__all__ = [
    "FSDP1_MESSAGE",
    "ShardedRoot",
    "check_strategy",
    "clip_by_global_norm",
    "full_state_dict",
    "global_grad_norm",
    "is_fsdp1",
    "is_model_parallel",
    "is_sharded",
    "run_gathered",
    "shard_network",
    "shard_units",
    "sharded_root",
]
