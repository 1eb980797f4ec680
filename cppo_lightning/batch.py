"""The batch the data side hands the module: the one contract between them.

A :class:`PromptBatch` holds ``B`` prompts. The prompt tokens are shared by every image view (all
perturbations keep the image size, so the number of image tokens and the layout are identical); only
the vision inputs differ between views. Vision inputs are kept per example, in the processor's own
format, so any architecture works: concatenating the per-example dicts along dim 0 gives the batched
inputs (Qwen's flat patches + ``image_grid_thw``, LLaVA's ``[B, 3, H, W]`` ...).

Any DataModule, ours or another project's, can feed :class:`cppo_lightning.CPPOModule` by yielding
this class (build it with :meth:`PromptBatch.from_examples`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

# The processor outputs laid out along the token axis (everything else a processor returns is a vision
# input), and the tile-axis vision inputs: the architecture table's, re-exported here.
from cppo_lightning.architectures import TEXT_KEYS as TEXT_KEYS
from cppo_lightning.architectures import TILE_KEYS

#: The image views, in the paper's terms: ``I``, ``I+`` (information-preserving), ``I-``
#: (information-removing), and PAPO's patch-masked view.
ORIGINAL = "original"
PRESERVING = "preserving"
REMOVING = "removing"
MASKED = "masked"
#: The perturbed views a DataModule makes (every view but the original).
PERTURBED_VIEWS = (PRESERVING, REMOVING, MASKED)
VIEW_NAMES = (ORIGINAL, *PERTURBED_VIEWS)


@dataclass
class EncodedPrompt:
    """One example after the processor, with all its views.

    Attributes:
        id: stable example id (used in every error and log message about it).
        text_inputs: token-axis tensors, each ``[L]``: ``input_ids``, ``attention_mask`` and any extra
            keys the model needs (``mm_token_type_ids`` ...).
        vision: view name -> vision inputs of this example (the processor's keys; a leading dim that
            concatenates into a batch).
        answer: the reference answer.
        question: the question text (without the chat template).
        images: view name -> the raw image (uint8 ``[H, W, 3]``) for visualisation.
        metadata: other dataset columns, passed to reward functions.
    """

    id: str
    text_inputs: dict[str, Tensor]
    vision: dict[str, dict[str, Tensor]]
    answer: str
    question: str = ""
    images: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def concat_vision_inputs(parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-example vision inputs along dim 0.

    Tile-axis inputs (the architecture table's ``tile_keys``: Idefics3's ``pixel_values``
    ``[1, tiles, 3, H, W]`` and ``pixel_attention_mask`` ``[1, tiles, H, W]``) of examples with different
    tile counts are zero-padded along dim 1 first, as the processor pads a batch of its own: the model
    skips all-zero tiles.

    Raises:
        ValueError: the examples have different keys or shapes that cannot be concatenated.
    """
    if not parts:
        return {}
    keys = list(parts[0])
    result = {}
    for key in keys:
        tensors = [part[key] for part in parts]
        if key in TILE_KEYS:
            tensors = _pad_tiles(tensors)
        try:
            result[key] = torch.cat(tensors, dim=0)
        except (RuntimeError, KeyError) as error:
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(
                f"vision input {key!r} cannot be batched, per-example shapes {shapes}: {error}"
            ) from None
    return result


def _pad_tiles(tensors: list[Tensor]) -> list[Tensor]:
    """Zero-pad ``[n, tiles, ...]`` tensors along dim 1 to the largest tile count (other dims must agree)."""
    if len({t.dim() for t in tensors}) != 1 or tensors[0].dim() < 3:
        return tensors
    if len({t.shape[1] for t in tensors}) == 1 or len({t.shape[2:] for t in tensors}) != 1:
        return tensors  # nothing to pad, or tiles of different sizes (concatenation names the shapes)
    tiles = max(t.shape[1] for t in tensors)
    return [
        torch.cat([t, t.new_zeros((t.shape[0], tiles - t.shape[1], *t.shape[2:]))], dim=1)
        if t.shape[1] < tiles
        else t
        for t in tensors
    ]


@dataclass
class PromptBatch:
    """``B`` prompts with shared tokens and several image views.

    Attributes:
        input_ids: ``[B, P]`` prompt ids, left-padded.
        attention_mask: ``[B, P]``.
        text_inputs: other token-axis keys, each ``[B, P]`` (e.g. ``mm_token_type_ids``).
        vision: view name -> ``B`` per-example vision-input dicts.
        answers: ``B`` reference answers.
        ids: ``B`` example ids.
        questions: ``B`` question texts.
        images: view name -> ``B`` raw uint8 images (may be empty).
        metadata: ``B`` dicts of extra dataset columns.
    """

    input_ids: Tensor
    attention_mask: Tensor
    vision: dict[str, list[dict[str, Tensor]]]
    answers: list[str]
    ids: list[str]
    questions: list[str] = field(default_factory=list)
    text_inputs: dict[str, Tensor] = field(default_factory=dict)
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        size = self.input_ids.shape[0]
        if self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(self.attention_mask.shape)} does not match input_ids "
                f"{tuple(self.input_ids.shape)}"
            )
        for key, value in self.text_inputs.items():
            if value.shape != self.input_ids.shape:
                raise ValueError(
                    f"text input {key!r} {tuple(value.shape)} does not match input_ids {tuple(self.input_ids.shape)}"
                )
        for name, per_example in self.vision.items():
            if len(per_example) != size:
                raise ValueError(
                    f"view {name!r} has vision inputs for {len(per_example)} examples, batch has {size}"
                )
        for name, values in (("answers", self.answers), ("ids", self.ids)):
            if len(values) != size:
                raise ValueError(f"{name} has {len(values)} entries, batch has {size} prompts")
        if ORIGINAL not in self.vision:
            raise ValueError(f"a PromptBatch needs the {ORIGINAL!r} view; it has {sorted(self.vision)}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def views(self) -> tuple[str, ...]:
        """Names of the image views this batch carries."""
        return tuple(self.vision)

    @property
    def prompt_length(self) -> int:
        """``P``, the padded prompt length."""
        return self.input_ids.shape[1]

    def prompt_lengths(self) -> list[int]:
        """Each prompt's number of real (non-padding) tokens, image tokens included."""
        return self.attention_mask.sum(dim=1).tolist()

    def model_inputs(
        self, view: str, rows: Tensor | Sequence[int] | None = None, prompt_length: int | None = None
    ) -> dict[str, Tensor]:
        """Model inputs (tokens + one view's vision inputs) for the given examples.

        Args:
            view: which image view.
            rows: example indices, repeats allowed (e.g. ``arange(B).repeat_interleave(G)`` for
                ``G`` rollouts per prompt); default all examples once.
            prompt_length: keep only the last ``prompt_length`` token columns (the prompts are
                left-padded, so this drops padding when it is at least the longest selected prompt).

        Returns:
            A dict for ``model(**inputs)`` / ``model.generate(**inputs)``.

        Raises:
            KeyError: the batch does not carry that view.
        """
        if view not in self.vision:
            raise KeyError(
                f"this batch has no {view!r} view (it has {list(self.vision)}); the DataModule must be asked for it"
            )
        if rows is None:
            rows = torch.arange(len(self))
        rows = torch.as_tensor(rows, dtype=torch.long)
        index = rows.to(self.input_ids.device)
        start = 0 if prompt_length is None else max(0, self.prompt_length - prompt_length)
        inputs = {
            "input_ids": self.input_ids[index, start:],
            "attention_mask": self.attention_mask[index, start:],
        }
        for key, value in self.text_inputs.items():
            inputs[key] = value[index, start:]
        inputs.update(concat_vision_inputs([self.vision[view][i] for i in rows.tolist()]))
        return inputs

    @classmethod
    def from_examples(cls, examples: Sequence[EncodedPrompt], pad_token_id: int) -> PromptBatch:
        """Left-pad and stack encoded examples into a batch.

        Raises:
            ValueError: examples lack a view another has, or carry different token-axis keys
                (the message names the example).
        """
        if not examples:
            raise ValueError("cannot build a PromptBatch from zero examples")
        views = list(examples[0].vision)
        text_keys = list(examples[0].text_inputs)
        for example in examples:
            if list(example.vision) != views:
                raise ValueError(f"example {example.id!r} has views {list(example.vision)}, expected {views}")
            if list(example.text_inputs) != text_keys:
                raise ValueError(
                    f"example {example.id!r} has text keys {list(example.text_inputs)}, expected {text_keys}"
                )
        length = max(example.text_inputs["input_ids"].shape[-1] for example in examples)
        padded: dict[str, list[Tensor]] = {key: [] for key in text_keys}
        for example in examples:
            for key in text_keys:
                value = example.text_inputs[key].reshape(-1)
                fill = pad_token_id if key == "input_ids" else 0
                pad = value.new_full((length - value.shape[0],), fill)
                padded[key].append(torch.cat([pad, value]))
        stacked = {key: torch.stack(values) for key, values in padded.items()}
        return cls(
            input_ids=stacked.pop("input_ids"),
            attention_mask=stacked.pop("attention_mask"),
            text_inputs=stacked,
            vision={view: [example.vision[view] for example in examples] for view in views},
            answers=[example.answer for example in examples],
            ids=[example.id for example in examples],
            questions=[example.question for example in examples],
            images={
                view: [example.images[view] for example in examples]
                for view in views
                if all(view in example.images for example in examples)
            },
            metadata=[example.metadata for example in examples],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PromptBatch:
        """Move every tensor to ``device`` (Lightning calls this to transfer the batch)."""

        def move(tensor: Tensor) -> Tensor:
            return tensor.to(device, non_blocking=non_blocking)

        return PromptBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            text_inputs={key: move(value) for key, value in self.text_inputs.items()},
            vision={
                view: [{key: move(value) for key, value in inputs.items()} for inputs in per_example]
                for view, per_example in self.vision.items()
            },
            answers=self.answers,
            ids=self.ids,
            questions=self.questions,
            images=self.images,
            metadata=self.metadata,
        )

    def pin_memory(self) -> PromptBatch:
        """Pinned-memory copy (for ``DataLoader(pin_memory=True)``)."""
        pinned = self.to("cpu")
        pinned.input_ids = pinned.input_ids.pin_memory()
        pinned.attention_mask = pinned.attention_mask.pin_memory()
        return pinned
