"""Loading a policy: any ``AutoModelForImageTextToText`` checkpoint, with LoRA, QLoRA or full fine-tuning.

The reference policy (the KL anchor) costs no second copy under LoRA/QLoRA: it is the same network with
its adapters disabled. Full fine-tuning keeps a frozen copy. A KL weight of 0 means no reference at all.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from cppo_lightning.architectures import (
    Architecture,
    architecture,
    architecture_of,
    generic_architecture,
    vision_attributes,
)
from cppo_lightning.models.tiny import is_random_spec, is_tiny_spec, resolve_random_spec, resolve_tiny_spec

log = logging.getLogger(__name__)

# Every module path below comes from the architecture table (cppo_lightning/architectures.py).
# The language model's attention and MLP projections. A bare name list would also hit the Qwen vision
# MLP (`model.visual.blocks.N.mlp.gate_proj`), hence a regex anchored on the language model's attribute.
LANGUAGE_MODEL_TARGETS = architecture("qwen2_5_vl").lora_targets

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoRAConfig:
    """LoRA adapters.

    Args:
        r: rank.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter input. Keep 0 for RL: dropout makes ``pi_old`` and the
            re-scored ``pi`` differ even before any update.
        target_modules: regex (``re.fullmatch`` on module names) of the linear layers to adapt;
            None (default): the language model's projections as the architecture table names them
            (attention and MLP; Qwen3.5 adds its Gated DeltaNet projections; Idefics3's language model
            is ``text_model``).
        include_vision_tower: also adapt the vision encoder's linear layers.
        include_projector: also adapt the vision-language projector.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | None = None
    include_vision_tower: bool = False
    include_projector: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.r, int) or self.r < 1:
            problems.append(f"r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        try:
            if self.target_modules is not None:
                re.compile(self.target_modules)
        except (re.error, TypeError) as error:
            problems.append(f"target_modules is not a valid regex: {self.target_modules!r} ({error})")
        if problems:
            raise ValueError("lora: " + "; ".join(problems))

    def target_regex(self, arch: Architecture | None = None) -> str:
        """The union of the configured targets as one regex.

        Args:
            arch: the model's architecture (its table entry); None: the names most VLMs share.

        Raises:
            ValueError: ``include_projector`` for an architecture whose projector has no linear layer.
        """
        arch = arch or generic_architecture()
        parts = [self.target_modules or arch.lora_targets]
        if self.include_vision_tower:
            parts.append(arch.vision_targets)
        if self.include_projector:
            if arch.projector_targets is None:
                raise ValueError(
                    f"lora.include_projector: {arch.name}'s vision-language projector has no linear layer "
                    "LoRA could adapt; set model.policy.lora.include_projector to false"
                )
            parts.append(arch.projector_targets)
        return "|".join(f"(?:{p})" for p in parts)


@dataclass
class PolicyConfig:
    """Which checkpoint to fine-tune, and how.

    Args:
        model_name_or_path: hub id, local folder, ``tiny:<architecture>-<size>`` (built offline), or
            ``random:<architecture>[@text_layers=N,...]`` (a released architecture with random weights).
        finetuning: ``"lora"``, ``"qlora"`` (4-bit NF4 base + LoRA) or ``"full"``.
        lora: adapter settings for ``lora``/``qlora``.
        dtype: weight dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``; None lets transformers choose.
        gradient_checkpointing: recompute activations in backward (non-reentrant, works with PEFT).
        freeze_vision_tower: no gradient into the vision encoder (full fine-tuning; under LoRA the base
            is frozen anyway).
        bnb_4bit_compute_dtype: compute dtype of the 4-bit layers (``qlora``).
        bnb_4bit_double_quant: quantize the quantization constants too (``qlora``).
        revision: hub revision.
        trust_remote_code: passed to ``transformers``.
    """

    model_name_or_path: str = "tiny:qwen2_5_vl-smoke"
    finetuning: Literal["lora", "qlora", "full"] = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dtype: str = "auto"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    freeze_vision_tower: bool = False
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_double_quant: bool = True
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        # Checked before anything is loaded (a bad value would otherwise surface minutes later).
        problems = []
        if not str(self.model_name_or_path or "").strip():
            problems.append("model_name_or_path is empty")
        if self.finetuning not in ("lora", "qlora", "full"):
            problems.append(f"finetuning must be 'lora', 'qlora' or 'full', got {self.finetuning!r}")
        for name in ("dtype", "bnb_4bit_compute_dtype"):
            value = getattr(self, name)
            if value != "auto" and value not in _DTYPES and not isinstance(value, torch.dtype):
                problems.append(f"{name} {value!r} is not one of 'auto', {sorted(_DTYPES)}")
        if isinstance(self.lora, dict):  # from a checkpoint's plain hyperparameters
            self.lora = LoRAConfig(**self.lora)
        if problems:
            raise ValueError("policy: " + "; ".join(problems))


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Turn a model name into what ``from_pretrained`` takes, checking local paths exist.

    ``tiny:`` and ``random:`` specs are built (once) into the cache folder. A name that looks like a local path (starts
    with ``.``, ``/``, ``~`` or exists) must be an existing folder; anything else is a hub id.

    Raises:
        FileNotFoundError: a local path that does not exist.
    """
    name = os.fspath(name_or_path)
    if is_tiny_spec(name):
        return str(resolve_tiny_spec(name))
    if is_random_spec(name):
        return str(resolve_random_spec(name))
    path = Path(name).expanduser()
    # Hub ids are "name" or "owner/name"; anything else that is path-like must exist locally.
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise FileNotFoundError(f"model path {name!r} does not exist (or is not a folder)")
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model folder {name!r} has no config.json: not a transformers checkpoint"
            )
        return str(path)
    return name


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | str:
    """Map a dtype name from YAML to a ``torch.dtype`` (``"auto"`` passes through)."""
    if name is None or name == "auto":
        return "auto"
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of 'auto', {sorted(_DTYPES)}")
    return _DTYPES[name]


def context_length(model: nn.Module) -> int | None:
    """Positions the language model was built for (``max_position_embeddings`` of its text config), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a VLM (the table's attribute: ``visual``, ``vision_tower``, ``vision_model``), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    known = architecture_of(config).vision_tower if config is not None else None
    names = tuple(dict.fromkeys(name for name in (known, *vision_attributes()) if name))
    for owner in (getattr(base, "model", None), base):
        for name in names:
            module = getattr(owner, name, None) if owner is not None else None
            if isinstance(module, nn.Module):
                return module
    return None


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of every linear layer (plain or quantized) of ``model``."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.append(name)
    return names


def lora_target_names(model: nn.Module, lora: LoRAConfig) -> list[str]:
    """The linear layers a LoRA config adapts (``re.fullmatch`` of its regex on module names).

    Raises:
        ValueError: the pattern matches no linear layer (the message lists some that exist).
    """
    arch = architecture_of(model)
    regex = lora.target_regex(arch)
    try:
        pattern = re.compile(regex)
    except re.error as error:
        raise ValueError(
            f"LoRA target_modules is not a valid regex: {lora.target_modules!r} ({error})"
        ) from None
    linear = linear_layer_names(model)
    targets = [name for name in linear if pattern.fullmatch(name)]
    if not targets:
        examples = ", ".join(linear[:3] + linear[-3:])
        raise ValueError(
            f"LoRA target pattern {regex!r} matches no linear layer of "
            f"{type(model).__name__}; linear layers are named like: {examples}"
        )
    # A part of the union that adapts nothing would otherwise go unnoticed (the others still match).
    for flag, part in (
        ("include_vision_tower", arch.vision_targets),
        ("include_projector", arch.projector_targets),
    ):
        if getattr(lora, flag) and not any(re.fullmatch(part, name) for name in linear):
            raise ValueError(
                f"lora.{flag}: no linear layer of {type(model).__name__} matches {part!r} ({arch.name})"
            )
    return targets


def _disable_cpu_bf16_repacking(model: nn.Module) -> None:
    # On CPUs with AVX512-BF16 the first no-grad eval forward repacks every Linear4bit into an
    # inference-only layout, after which every training forward fails. Keep the trainable layout.
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _contiguous_head_inputs(model: nn.Module) -> None:
    # generate's first step applies the head to hidden[:, -1:], a strided 3D view; on the CPU PyTorch's
    # matmul then copies the [vocab, hidden] weight once per row (a [rows, hidden, vocab] tensor: 2.5 GB
    # and 40 s for 4 rows at Qwen2.5-VL's 151,936 x 2,048). A contiguous input takes the plain GEMM path.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        head.register_forward_pre_hook(
            lambda module, args: tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        )


def load_model(config: PolicyConfig, device_map: str | dict | torch.device | None = None):
    """Load the base ``AutoModelForImageTextToText`` (4-bit under ``qlora``), without adapters.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: the checkpoint is not a vision-language model.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig

    path = resolve_model_path(config.model_name_or_path)
    hf_config = AutoConfig.from_pretrained(
        path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    kwargs: dict = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
    kwargs["dtype"] = torch_dtype(config.dtype)
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.finetuning == "qlora":
        compute = torch_dtype(config.bnb_4bit_compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=config.bnb_4bit_double_quant,
            # The vision side and the head stay in full precision. Any list replaces transformers'
            # default that keeps `lm_head`, so the table lists it again.
            llm_int8_skip_modules=list(architecture_of(hf_config).unquantized),
        )
        if device_map is not None:
            kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise ValueError(
                f"{config.model_name_or_path!r} ({type(hf_config).__name__}, model_type "
                f"{hf_config.model_type!r}) is not a vision-language model: AutoModelForImageTextToText "
                "cannot load it. Use an image-text-to-text checkpoint such as Qwen/Qwen2.5-VL-3B-Instruct."
            ) from None
        raise
    if vision_tower(model) is None:
        raise ValueError(f"{config.model_name_or_path!r} has no vision tower: not a vision-language model")
    if config.finetuning == "qlora":
        _disable_cpu_bf16_repacking(model)
    _contiguous_head_inputs(model)
    return model


def _keep_vision_dtype(model: nn.Module, loaded: dict[str, torch.dtype]) -> None:
    """Put the vision tower and projector back in the dtype they were loaded in, after peft's QLoRA preparation.

    ``prepare_model_for_kbit_training`` upcasts every unquantized weight to fp32 for the stability of what
    trains. The vision side does not train under QLoRA (LoRA targets the language model; a vision LoRA
    keeps its own adapters in fp32 anyway), runs in the compute dtype under autocast, and is the largest
    unquantized part: Qwen2.5-VL-3B's 670 M-parameter tower is 1.3 GB in bf16 and 2.5 GB in fp32. Its
    output is cast to the text embeddings' dtype before it enters the language model, whose norms and
    embedding/head stay in fp32 as peft leaves them (they meet the 4-bit layers' outputs).

    Args:
        model: the quantized base after ``prepare_model_for_kbit_training`` (not yet wrapped by peft).
        loaded: each parameter's dtype before the preparation.
    """
    arch = architecture_of(model.config)
    for path in arch.unquantized:
        if path.rsplit(".", 1)[-1] in ("lm_head", "embed_tokens"):
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # a generic entry lists every known name
        for name, param in module.named_parameters(prefix=path):
            dtype = loaded.get(name)
            if dtype is not None and dtype != param.dtype and dtype.is_floating_point:
                param.data = param.data.to(dtype)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing propagates gradients to LoRA weights without requiring the inputs
    # to carry gradient (the reentrant variant needs `enable_input_require_grads`).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


class Policy(nn.Module):
    """The trained VLM, its processor, and the reference policy.

    Attributes:
        model: the network to train and sample from (a ``PeftModel`` under LoRA/QLoRA).
        processor: its processor.
        config: the :class:`PolicyConfig` it was loaded from.
        reference_mode: ``"disabled_adapters"`` (LoRA/QLoRA), ``"frozen_copy"`` (full fine-tuning),
            or None (no KL term).
    """

    def __init__(self, model: nn.Module, processor, config: PolicyConfig, reference_mode: str | None):
        super().__init__()
        # from_pretrained returns eval mode; Lightning keeps modules in the mode it finds them, and
        # gradient checkpointing only runs in train mode.
        self.model = model.train()
        self.processor = processor
        self.config = config
        self.reference_mode = reference_mode
        # A frozen copy is not a registered submodule of `model` and is never trained or checkpointed.
        self.reference_model: nn.Module | None = None
        if reference_mode == "frozen_copy":
            self.reference_model = copy.deepcopy(model).requires_grad_(False).eval()

    @property
    def uses_adapters(self) -> bool:
        """Whether the trainable parameters are LoRA adapters."""
        return self.config.finetuning in ("lora", "qlora")

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """Context in which the yielded module computes the reference policy's outputs.

        Raises:
            RuntimeError: the policy was loaded without a reference (KL weight 0).
        """
        if self.reference_mode is None:
            raise RuntimeError("this policy was loaded without a reference policy (KL weight 0)")
        if self.reference_mode == "disabled_adapters":
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.reference_model

    def unwrapped(self) -> nn.Module:
        """The ``transformers`` model under any PEFT wrapper (for configs and ``generate`` settings)."""
        model = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]


def load_policy(
    config: PolicyConfig,
    reference: bool = True,
    device_map: str | dict | torch.device | None = None,
    processor=None,
) -> Policy:
    """Load a policy for RL fine-tuning.

    Args:
        config: what to load and how (LoRA/QLoRA/full, dtype, checkpointing...).
        reference: whether a reference policy is needed (False when the KL weight is 0).
        device_map: where to place a 4-bit model (bitsandbytes quantizes while loading).
        processor: an already-loaded processor to reuse.

    Returns:
        A :class:`Policy`.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: not a vision-language checkpoint, or LoRA targets that match nothing.
    """
    from cppo_lightning.models.processors import load_processor

    model = load_model(config, device_map=device_map)  # config.finetuning was checked when it was built
    if processor is None:
        processor = load_processor(config.model_name_or_path, config.revision, config.trust_remote_code)

    if config.finetuning == "full":
        if config.freeze_vision_tower:
            vision_tower(model).requires_grad_(False)
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        return Policy(model, processor, config, "frozen_copy" if reference else None)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = lora_target_names(model, config.lora)
    if config.finetuning == "qlora":
        # Casts the unquantized weights (norms, vision tower, head) to fp32 and freezes the base; the
        # frozen vision side goes back to the dtype it was loaded in (see _keep_vision_dtype).
        loaded = {name: param.dtype for name, param in model.named_parameters()}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_vision_dtype(model, loaded)
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        # The resolved names of linear layers only: a regex would also catch norms inside a projector.
        target_modules=targets,
        bias="none",
    )
    model = get_peft_model(model, lora)
    log.info("LoRA on %d linear layers (%s)", len(targets), config.finetuning)
    return Policy(model, processor, config, "disabled_adapters" if reference else None)


def load_policy_on(
    config: PolicyConfig,
    device: torch.device | str | None,
    reference: bool = True,
    move: bool = True,
) -> Policy:
    """Load a policy to run on ``device``: the one place that decides where the weights are loaded.

    A QLoRA policy on a GPU is placed there by the load itself (bitsandbytes quantizes while loading, so each
    rank's 4-bit copy goes to its own GPU directly); any other policy is loaded on the CPU and, with
    ``move``, moved to ``device`` (training leaves the move to Lightning's strategy).

    Args:
        config: what to load and how.
        device: where the policy runs (None: the CPU, nothing placed).
        reference: whether a reference policy is needed (False when the KL weight is 0).
        move: move a policy not placed by the load to ``device``.

    Returns:
        A :class:`Policy`.
    """
    device = torch.device(device) if device is not None else None
    placed = config.finetuning == "qlora" and device is not None and device.type == "cuda"
    policy = load_policy(config, reference=reference, device_map={"": device} if placed else None)
    if move and device is not None and not placed:
        policy.to(device)
    return policy
