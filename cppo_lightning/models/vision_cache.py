"""Each image encoded once per rollout batch: the vision tower's outputs kept for every pass of the update.

Under LoRA and QLoRA (their defaults) the vision tower and the projector are frozen, and the reference
policy (the same network with its adapters disabled) shares them, so an image's features are the same in
the old-policy, reference, frozen-view, advance-selection and gradient passes. :class:`VisionCache`
encodes each distinct ``(example, view)`` image once, with transformers' own ``get_image_features``, and
hands the features back through the ``mm_encoder_outputs`` argument that transformers 5 VLMs accept in
place of pixels (what ``generate`` uses to encode once before expanding a batch). Qwen3-VL's DeepStack
features (vision features injected at several decoder layers) travel in the same output object.

When the vision side is trained (full fine-tuning, a vision LoRA), its features change with every
optimizer step and must carry gradient: :meth:`VisionCache.usable` says no, and the forward encodes
its images itself (once per image and forward with the grouped forward, not once per row). So it does
under FSDP2, where an encode is a collective every rank must make in step.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cppo_lightning.architectures import architecture_of
from cppo_lightning.batch import PromptBatch


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_side_trainable(model: nn.Module) -> bool:
    """Whether any parameter of the backbone outside the language model (vision tower, projector) trains."""
    base = _base(model)
    backbone = getattr(base, "model", base)
    entry = architecture_of(base)
    return any(
        parameter.requires_grad and not entry.is_language_model(f"model.{name}")
        for name, parameter in backbone.named_parameters()
    )


def merge_encoder_outputs(outputs: Sequence[object]) -> object:
    """One encoder output for several images, in order, from the outputs of each image alone.

    The fields the VLMs read: ``pooler_output`` (a tensor with the images along dim 0, or a tuple with one
    entry per image) and Qwen3-VL's ``deepstack_features`` (a list over layers of such tuples).
    """

    def merge(values: list):
        first = values[0]
        if first is None:
            return None
        if isinstance(first, Tensor):
            return torch.cat(values)
        if isinstance(first, tuple):  # one entry per image
            return tuple(item for value in values for item in value)
        if isinstance(first, list):  # one entry per layer
            return [merge([value[i] for value in values]) for i in range(len(first))]
        raise TypeError(f"cannot merge image-encoder outputs of type {type(first).__name__}")

    first = outputs[0]
    fields = {"pooler_output": merge([output.pooler_output for output in outputs])}
    if getattr(first, "deepstack_features", None) is not None:
        fields["deepstack_features"] = merge([output.deepstack_features for output in outputs])
    return type(first)(**fields)


class VisionCache:
    """The vision encoder's outputs of a rollout batch's images, computed on first use.

    Args:
        batch: the prompts (their per-example vision inputs, per view).

    Attributes:
        encoded: images encoded so far (a test counts them).
    """

    def __init__(self, batch: PromptBatch) -> None:
        self.batch = batch
        self._outputs: dict[tuple[int, str, int], object] = {}
        self.encoded = 0

    @staticmethod
    def usable(model: nn.Module) -> bool:
        """Whether ``model``'s image features can be reused across passes (frozen vision side, a
        transformers VLM that accepts ``mm_encoder_outputs``)."""
        base = _base(model)
        backbone = getattr(base, "model", None)
        if backbone is None or not hasattr(backbone, "get_image_features"):
            return False
        if "mm_encoder_outputs" not in inspect.signature(backbone.forward).parameters:
            return False
        from cppo_lightning.sharding import is_sharded

        # Under FSDP2 every encode gathers the vision blocks' shards: the ranks must encode in step, which
        # lazily filled per-rank caches would not (each rank's rows need other images): encode per forward.
        return not vision_side_trainable(model) and not is_sharded(model)

    def outputs(self, model: nn.Module, view: str, examples: Sequence[int]) -> object:
        """The merged encoder output of these examples' images under one view (repeats allowed)."""
        backbone = _base(model).model
        found = []
        for example in examples:
            key = (id(backbone), view, int(example))
            if key not in self._outputs:
                self._outputs[key] = self._encode(backbone, self.batch.vision[view][int(example)])
            found.append(self._outputs[key])
        return merge_encoder_outputs(found)

    def _encode(self, backbone: nn.Module, vision: dict[str, Tensor]) -> object:
        accepted = set(inspect.signature(backbone.get_image_features).parameters)
        kwargs = {key: value for key, value in vision.items() if key in accepted}
        with torch.no_grad():
            output = backbone.get_image_features(**kwargs, return_dict=True)
        self.encoded += 1
        fields = {"pooler_output": _detach(output.pooler_output)}
        if getattr(output, "deepstack_features", None) is not None:
            fields["deepstack_features"] = _detach(output.deepstack_features)
        return type(output)(**fields)


def _detach(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(item) for item in value)
    return value


def without_pixels(vision: dict[str, Tensor]) -> dict[str, Tensor]:
    """Vision inputs without the pixels (what the model still needs besides the encoder's outputs:
    Qwen's ``image_grid_thw`` for its positions)."""
    return {key: value for key, value in vision.items() if not key.startswith("pixel_")}


__all__ = ["VisionCache", "merge_encoder_outputs", "vision_side_trainable", "without_pixels"]
