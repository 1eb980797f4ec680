"""The architecture table: what the package must know about each VLM family, in one place.

Every other file reads it: LoRA targets, the modules kept unquantized under QLoRA and the vision
attributes (``models/loading.py``), the image-only processors (``models/processors.py``), the tiny
offline builders (``models/tiny.py``), the token-axis and tile-padded processor outputs (``batch.py``,
``models/scoring.py``), the logit soft-cap of the head (``models/scoring.py``) and the image sizing of
the data side (``datamodules``). Adding an architecture is one :class:`Architecture` entry in
:data:`ARCHITECTURES` (plus, to test it on a CPU, a tiny builder in ``models/tiny.py``).

The module is plain Python (no torch, no transformers) so that the batch contract can import it.

How images become tokens decides whether CPPO's views can share one token layout (every perturbation
keeps the image size, so the views must give the same tokens whenever the count depends on the size
alone):

- ``dynamic``: the image is resized to sides that are multiples of patch x merge pixels and becomes one
  token per (patch x merge)^2 pixels (Qwen2.5-VL, Qwen3-VL, Qwen3.5). Depends on the size only.
- ``fixed``: the processor resizes every image to one square size: a constant number of tokens (LLaVA,
  Gemma 3 without pan-and-scan). Gemma 3's pan-and-scan crops depend on the aspect ratio only.
- ``tiled``: the longest side is resized to a fixed length, the image split into a grid of tiles that
  the aspect ratio decides, plus a global view (Idefics3 / SmolVLM). Depends on the size only; examples
  of different aspect ratios have different tile counts, so their tile-axis outputs are zero-padded
  when batched (the model drops all-zero tiles, as it does for its own processor's padding).

None of the families here lays out tokens by image content, so none is refused; an architecture that
did would fail the data side's same-layout check (``PromptEncoder.encode``), which names the example.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

#: Linear projections of a Llama/Qwen/Gemma-style decoder layer (attention, then MLP).
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Qwen3.5's Gated DeltaNet layers (three of every four): the query-key-value and output-gate inputs and
#: the output projection. ``in_proj_a``/``in_proj_b`` (one output per value head: the decay and the
#: write strength) are left out: a rank-64 adapter would be larger than the layer.
GATED_DELTANET_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "out_proj")
#: Linear layer names inside vision-encoder blocks (ViT/CLIP/SigLIP naming and Qwen's).
VISION_LINEAR = (
    "qkv",
    "proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
    "linear_fc1",
    "linear_fc2",
    "gate_proj",
    "up_proj",
    "down_proj",
)

ImageTokens = Literal["dynamic", "fixed", "tiled"]


@dataclass(frozen=True)
class Architecture:
    """What the package needs to know about one VLM family (one ``config.model_type``).

    Module paths are those of ``AutoModelForImageTextToText`` in transformers 5 (``model.<...>``).

    Attributes:
        model_type: ``config.model_type`` of the checkpoints.
        name: the family's name in messages and the README.
        language_model: attribute (a regex) of the language model under ``model`` (``language_model``,
            ``text_model``): LoRA's default targets and the vLLM engine's language-model check.
        lora_projections: linear layers of the language model that LoRA adapts by default.
        vision_tower: attribute of the vision encoder under ``model`` (``visual``, ``vision_tower``,
            ``vision_model``).
        vision_blocks: regex of the module path of the vision encoder's blocks (``include_vision_tower``;
            under FSDP2 each block ``<vision_blocks>.<i>`` is a unit of its own).
        projector: regex of the module path of the vision-language projector (``include_projector``);
            None when the projector has no linear layer LoRA could adapt (Gemma 3's is a bare weight).
        unquantized: module paths kept in full precision under QLoRA (vision side and output head).
        image_tokens: how images become tokens (see the module docstring).
        token_keys: processor outputs laid along the token axis besides ``input_ids``/``attention_mask``
            (extended with zeros over a completion when re-scoring).
        tile_keys: per-image outputs laid out ``[examples, tiles, ...]``: zero-padded along the tiles
            when examples with different tile counts are batched.
        logit_softcap: the VLM class applies ``final_logit_softcapping`` to its logits (the scorer
            applies the head itself, so it must know; Gemma 3's VLM class does not, even if set).
        processor: the image-only processor class (``module:Class``) to load instead of
            ``AutoProcessor``, for families whose processor wants a video processor (torchvision).
        tiny: name of the tiny offline builder (``tiny:<tiny>-smoke``), None when there is none.
        vllm: the colocated vLLM rollout engine is tested with this family (its prompt-token layout:
            ``engines/vllm.py`` collapses each run of image tokens to the one placeholder vLLM expands).
        checkpoints: hub ids of released checkpoints (README and messages; never downloaded here).
        notes: what a user should know (README table).
        decoder_layers: attribute of the decoder layer list under the language model: under FSDP2 each
            ``<language_model>.<decoder_layers>.<i>`` is a unit of its own (``cppo_lightning/sharding.py``).
    """

    model_type: str
    name: str
    language_model: str
    lora_projections: tuple[str, ...]
    vision_tower: str
    vision_blocks: str
    projector: str | None
    unquantized: tuple[str, ...]
    image_tokens: ImageTokens
    token_keys: tuple[str, ...] = ()
    tile_keys: tuple[str, ...] = ()
    logit_softcap: bool = False
    processor: str | None = None
    tiny: str | None = None
    vllm: bool = False
    checkpoints: tuple[str, ...] = ()
    notes: str = ""
    #: Image tokens attend to every token of their image, later ones included (Gemma 3's
    #: ``token_type_ids`` blocks); the grouped forward builds the same mask.
    bidirectional_image_attention: bool = False
    #: Why the update cannot compute a prompt once for its group (None: it can; see
    #: ``models/grouped.py``); such a family is scored one row per rollout.
    shared_prefix_refusal: str | None = None
    decoder_layers: str = "layers"
    #: Set for the fallback entry of a model type missing from the table.
    generic: bool = field(default=False, compare=False)

    @property
    def lora_targets(self) -> str:
        """Regex (``re.fullmatch`` on module names) of the language model's default LoRA targets."""
        return rf".*{self.language_model}.*\.({'|'.join(self.lora_projections)})"

    @property
    def vision_targets(self) -> str:
        """Regex of the vision encoder's linear layers."""
        return rf".*({self.vision_blocks})\..*\.({'|'.join(VISION_LINEAR)})"

    @property
    def projector_targets(self) -> str | None:
        """Regex of the projector's linear layers (None: it has none)."""
        return None if self.projector is None else rf".*({self.projector})\..*"

    def image_sizing(self, image_processor: Any) -> tuple[int, int | None, int | None]:
        """How the data side resizes images before the processor: ``(factor, min_pixels, max_pixels)``.

        ``dynamic``: sides multiples of patch x merge, the processor's own pixel bounds (its
        ``size.shortest_edge``/``longest_edge`` are areas in pixels). ``fixed``/``tiled``: the processor
        resizes anyway, so no rounding and no default bounds (a configured ``max_pixels`` still caps
        the image the perturbations work on).
        """
        if self.image_tokens != "dynamic":
            return 1, None, None
        patch = getattr(image_processor, "patch_size", None) or 14
        merge = getattr(image_processor, "merge_size", None) or 1
        size = getattr(image_processor, "size", None)
        bounds = (getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None))
        return patch * merge, bounds[0], bounds[1]

    def is_language_model(self, module_name: str) -> bool:
        """Whether a module path lies inside the language model."""
        return re.search(rf"\.{self.language_model}\.", f".{module_name}.") is not None


_QWEN_VL_LORA = dict(language_model="language_model", vision_tower="visual")
_QWEN_UNQUANTIZED = ("model.visual", "lm_head")
_QWEN_IMAGE_ONLY_3 = "cppo_lightning.models.processors:ImageOnlyQwen3VLProcessor"

_ENTRIES = [
    Architecture(
        model_type="qwen2_5_vl",
        name="Qwen2.5-VL",
        lora_projections=DECODER_PROJECTIONS,
        vision_blocks=r"visual\.blocks",
        projector=r"visual\.merger",
        unquantized=_QWEN_UNQUANTIZED,
        image_tokens="dynamic",
        token_keys=("mm_token_type_ids",),
        processor="cppo_lightning.models.processors:ImageOnlyQwen2_5_VLProcessor",
        tiny="qwen2_5_vl",
        vllm=True,
        checkpoints=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
        notes="the paper's model; patch 14 x merge 2: one token per 28 x 28 pixels",
        **_QWEN_VL_LORA,
    ),
    Architecture(
        model_type="qwen2_vl",
        name="Qwen2-VL",
        lora_projections=DECODER_PROJECTIONS,
        vision_blocks=r"visual\.blocks",
        projector=r"visual\.merger",
        unquantized=_QWEN_UNQUANTIZED,
        image_tokens="dynamic",
        token_keys=("mm_token_type_ids",),
        processor="cppo_lightning.models.processors:ImageOnlyQwen2_5_VLProcessor",
        checkpoints=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
        notes="Qwen2.5-VL's predecessor, same layout; no tiny builder",
        **_QWEN_VL_LORA,
    ),
    Architecture(
        model_type="qwen3_vl",
        name="Qwen3-VL",
        lora_projections=DECODER_PROJECTIONS,
        vision_blocks=r"visual\.blocks",
        # The merger and the DeepStack mergers (vision features of intermediate blocks fed to early
        # decoder layers).
        projector=r"visual\.(merger|deepstack_merger_list)",
        unquantized=_QWEN_UNQUANTIZED,
        image_tokens="dynamic",
        token_keys=("mm_token_type_ids",),
        processor=_QWEN_IMAGE_ONLY_3,
        tiny="qwen3_vl",
        checkpoints=("Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
        notes="patch 16 x merge 2: one token per 32 x 32 pixels",
        **_QWEN_VL_LORA,
    ),
    Architecture(
        model_type="qwen3_5",
        name="Qwen3.5",
        lora_projections=DECODER_PROJECTIONS + GATED_DELTANET_PROJECTIONS,
        vision_blocks=r"visual\.blocks",
        projector=r"visual\.merger",
        unquantized=_QWEN_UNQUANTIZED,
        image_tokens="dynamic",
        token_keys=("mm_token_type_ids",),
        processor=_QWEN_IMAGE_ONLY_3,
        tiny="qwen3_5",
        checkpoints=("Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-9B"),
        shared_prefix_refusal=(
            "Qwen3.5: its Gated DeltaNet layers carry a recurrent state over every earlier token of the "
            "sequence, so completions packed after one prompt would read their siblings"
        ),
        notes=(
            "natively multimodal; three of four decoder layers are Gated DeltaNet (linear attention: "
            "LoRA adapts in_proj_qkv, in_proj_z, out_proj); patch 16 x merge 2; its chat template "
            "opens <think> in the prompt, which the prompt builder removes (the format reward wants "
            "the completion to open it)"
        ),
        **_QWEN_VL_LORA,
    ),
    Architecture(
        model_type="gemma3",
        name="Gemma 3",
        language_model="language_model",
        lora_projections=DECODER_PROJECTIONS,
        vision_tower="vision_tower",
        vision_blocks=r"vision_tower\.vision_model\.encoder\.layers",
        # Gemma3MultiModalProjector is a bare weight matrix and an RMSNorm: nothing for LoRA.
        projector=None,
        unquantized=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        image_tokens="fixed",
        token_keys=("token_type_ids",),
        bidirectional_image_attention=True,
        tiny="gemma3",
        checkpoints=("google/gemma-3-4b-it", "google/gemma-3-12b-it"),
        notes=(
            "SigLIP at a fixed 896 x 896: 256 tokens per image; image tokens attend to each other both "
            "ways (token_type_ids); pan-and-scan (off by default) crops by aspect ratio only"
        ),
    ),
    Architecture(
        model_type="llava",
        name="LLaVA",
        language_model="language_model",
        lora_projections=DECODER_PROJECTIONS,
        vision_tower="vision_tower",
        vision_blocks=r"vision_tower\.vision_model\.encoder\.layers",
        projector=r"multi_modal_projector",
        unquantized=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        image_tokens="fixed",
        tiny="llava",
        checkpoints=("llava-hf/llava-1.5-7b-hf",),
        notes="CLIP at a fixed size (336 x 336 for LLaVA-1.5: 576 tokens per image)",
    ),
    Architecture(
        model_type="idefics3",
        name="Idefics3 / SmolVLM",
        language_model="text_model",
        lora_projections=DECODER_PROJECTIONS,
        vision_tower="vision_model",
        vision_blocks=r"vision_model\.encoder\.layers",
        projector=r"connector",
        unquantized=("model.vision_model", "model.connector", "lm_head"),
        image_tokens="tiled",
        tile_keys=("pixel_values", "pixel_attention_mask"),
        tiny="idefics3",
        checkpoints=("HuggingFaceTB/SmolVLM-Instruct", "HuggingFaceTB/SmolVLM-256M-Instruct"),
        notes=(
            "longest side resized to the processor's size (SmolVLM: 1536 px), split into 384 px tiles "
            "by aspect ratio + a global view; the language model is model.text_model"
        ),
    ),
]

#: model_type -> entry.
ARCHITECTURES: dict[str, Architecture] = {entry.model_type: entry for entry in _ENTRIES}

#: Processor outputs laid along the token axis (any architecture's); everything else is a vision input.
TEXT_KEYS: tuple[str, ...] = tuple(
    dict.fromkeys(("input_ids", "attention_mask", *(k for a in _ENTRIES for k in a.token_keys)))
)
#: Vision inputs zero-padded along their tile axis (dim 1) when examples with different tile counts meet.
TILE_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for a in _ENTRIES for k in a.tile_keys))

_warned: set[str] = set()


def _generic(model_type: str) -> Architecture:
    # Names most transformers 5 VLMs share; the language model is found as `language_model` (or
    # `text_model`), the vision side under any of the usual attributes.
    return Architecture(
        model_type=model_type,
        name=model_type,
        language_model="(language_model|text_model)",
        lora_projections=DECODER_PROJECTIONS,
        vision_tower="vision_tower",
        vision_blocks=r"visual\.blocks|vision_tower|vision_model",
        projector=r"visual\.merger|multi_modal_projector|connector",
        unquantized=(
            "model.visual",
            "model.vision_tower",
            "model.vision_model",
            "model.multi_modal_projector",
            "model.connector",
            "lm_head",
        ),
        image_tokens="fixed",
        # Unknown classes: trust the config (Gemma 3n's and Gemma 4's VLM classes do soft-cap).
        logit_softcap=True,
        generic=True,
    )


def generic_architecture() -> Architecture:
    """The fallback entry (the module names most transformers VLMs share), without the warning."""
    return _generic("generic")


def architecture(model_type: str | None) -> Architecture:
    """The table's entry for a model type; a generic fallback (logged once) for one not in the table.

    The fallback uses the names most transformers VLMs share; the data side's same-layout check still
    guards CPPO's views (a layout that changes with the image content is an error naming the example).
    """
    entry = ARCHITECTURES.get(str(model_type))
    if entry is not None:
        return entry
    if model_type not in _warned:
        _warned.add(model_type)
        log.warning(
            "model type %r is not in cppo_lightning's architecture table (%s): using generic module names "
            "(LoRA on language_model/text_model projections, vision side kept unquantized); untested",
            model_type,
            ", ".join(ARCHITECTURES),
        )
    return _generic(str(model_type))


def architecture_of(model_or_config: Any) -> Architecture:
    """The entry of a model (a transformers model, possibly inside a PEFT wrapper) or of its config."""
    obj = model_or_config
    if hasattr(obj, "get_base_model"):
        obj = obj.get_base_model()
    config = getattr(obj, "config", obj)
    return architecture(getattr(config, "model_type", None))


def vision_attributes() -> tuple[str, ...]:
    """Every vision-tower attribute name in the table (for models of a type not in it)."""
    return tuple(
        dict.fromkeys(("visual", "vision_tower", "vision_model", *(a.vision_tower for a in _ENTRIES)))
    )
