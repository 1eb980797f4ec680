"""Checking, cleaning and encoding examples.

Every example is checked once at set-up; a bad one is a *counted skip* with its reason and id, logged and
summarised, or (``strict``) an error naming it. Never a silent drop: the reference release silently
dropped every prompt longer than 512 tokens including image tokens, i.e. every large image. Here image
size is capped in pixels instead, and the prompt limit only catches genuinely long prompts.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cppo_lightning.batch import ORIGINAL, TEXT_KEYS, EncodedPrompt

log = logging.getLogger(__name__)

#: The release's instruction (EasyR1/verl "r1v" format), appended to every question.
DEFAULT_PROMPT_TEMPLATE = (
    "{question} You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer "
    "MUST BE put in \\boxed{{}}."
)

_PLACEHOLDER = re.compile(r"<image\s*\d*>", re.IGNORECASE)


class ExampleError(ValueError):
    """An example that cannot be used; ``reason`` is the short reason counted in the skip summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class ImageLimits:
    """Pixel limits. Images are resized (aspect kept) so that ``min_pixels <= H * W <= max_pixels`` and
    both sides are multiples of ``factor`` (the vision patch x merge size, 28 for Qwen2.5-VL); an image
    smaller than one patch is upscaled.
    """

    min_pixels: int | None = None
    max_pixels: int | None = None
    factor: int = 28


def fit_pixels(image: Image.Image, limits: ImageLimits) -> Image.Image:
    """Resize ``image`` into the pixel limits (Qwen's "smart resize": aspect kept, sides multiples of factor)."""
    width, height = image.size
    factor = max(1, limits.factor)
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if limits.max_pixels is not None and new_h * new_w > limits.max_pixels:
        beta = math.sqrt(height * width / limits.max_pixels)
        new_h = max(factor, math.floor(height / beta / factor) * factor)
        new_w = max(factor, math.floor(width / beta / factor) * factor)
    elif limits.min_pixels is not None and new_h * new_w < limits.min_pixels:
        beta = math.sqrt(limits.min_pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of an image in any mode (transparency composited on white, palettes expanded)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-9)
        return Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def open_image(value: Any, image_root: Path | None = None) -> Image.Image:
    """Decode one image value: a PIL image, bytes, ``{"bytes", "path"}``, a path, or a list of one of those.

    Raises:
        ExampleError: no image, several images, or an unreadable/corrupt one.
    """
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ExampleError("no image")
        if len(value) > 1:
            raise ExampleError("several images", f"{len(value)} images where one is expected")
        value = value[0]
    if value is None:
        raise ExampleError("no image")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, Mapping):
            if value.get("bytes"):
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(_resolve(value["path"], image_root))
            else:
                raise ExampleError("no image")
        elif isinstance(value, (str, Path)):
            if not str(value).strip():
                raise ExampleError("no image")
            image = Image.open(_resolve(value, image_root))
        else:
            raise ExampleError("unreadable image", f"unsupported value of type {type(value).__name__}")
        image.load()
    except ExampleError:
        raise
    # DecompressionBombError (PIL's pixel-count guard) derives from Exception only: without it here a
    # giant image would crash set-up instead of being a counted skip.
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ExampleError("unreadable image", f"{type(error).__name__}: {error}") from None
    if image.width < 1 or image.height < 1:
        raise ExampleError("unreadable image", f"empty image {image.size}")
    return image


def _resolve(path: str | Path, root: Path | None) -> Path:
    path = Path(path).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    if not path.exists():
        raise ExampleError("unreadable image", f"file {str(path)!r} does not exist")
    return path


def clean_question(question: Any) -> str:
    """The question text without ``<image>`` placeholders (the chat template places the image)."""
    if question is None:
        return ""
    return _PLACEHOLDER.sub("", str(question)).strip()


def clean_answer(answer: Any) -> str:
    """The reference answer as a string (a single-element list is unwrapped)."""
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if len(answer) == 1 else None
    if answer is None:
        return ""
    return str(answer).strip()


@dataclass
class SkipReport:
    """Counted skips of one data source, with the first few example ids per reason."""

    source: str
    total: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    converted: Counter = field(default_factory=Counter)

    def add(self, reason: str, example_id: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(example_id)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: kept/total and each reason with a few ids."""
        kept = self.total - self.skipped
        if not self.counts:
            text = f"{self.source}: kept all {self.total} examples"
        else:
            parts = [
                f"{count} {reason} (e.g. {', '.join(self.examples[reason])})"
                for reason, count in self.counts.most_common()
            ]
            text = f"{self.source}: kept {kept} of {self.total} examples; skipped " + "; ".join(parts)
        if self.converted:
            text += "; converted to RGB: " + ", ".join(
                f"{n} {mode}" for mode, n in self.converted.most_common()
            )
        return text


class PromptEncoder:
    """Turns a checked example into model inputs for every image view.

    Args:
        processor: the policy's processor.
        prompt_template: format string with ``{question}``.
        system_prompt: optional system message.
        limits: image pixel limits.
        max_prompt_tokens: longest allowed prompt, image tokens included (None: no limit).
    """

    def __init__(
        self,
        processor,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        system_prompt: str | None = None,
        limits: ImageLimits | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.processor = processor
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.limits = limits or ImageLimits()
        self.max_prompt_tokens = max_prompt_tokens

    def prompt_text(self, question: str) -> str:
        """The chat-templated prompt for one question."""
        from cppo_lightning.models import chat_prompt

        return chat_prompt(self.processor, self.prompt_template.format(question=question), self.system_prompt)

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Number of image tokens the processor will insert for an image of ``(width, height)``."""
        try:
            data = self.processor._get_num_multimodal_tokens(image_sizes=[[size[1], size[0]]])
            return int(data["num_image_tokens"][0])
        except (AttributeError, KeyError, TypeError, NotImplementedError):
            return 0

    def check(self, question: str, image: Image.Image) -> int:
        """Prompt length in tokens (text + image) of a resized image.

        Raises:
            ExampleError: the prompt is longer than ``max_prompt_tokens``.
        """
        text_ids = self.processor.tokenizer(self.prompt_text(question))["input_ids"]
        image_tokens = self.image_tokens(image.size)
        length = len(text_ids) + image_tokens
        if image_tokens:
            # The processor replaces the template's image placeholder by the image tokens: not counted twice.
            placeholder = getattr(self.processor, "image_token_id", None)
            length -= sum(1 for token in text_ids if token == placeholder)
        if self.max_prompt_tokens is not None and length > self.max_prompt_tokens:
            raise ExampleError(
                "prompt too long", f"{length} tokens > max_prompt_tokens={self.max_prompt_tokens}"
            )
        return length

    def encode(
        self,
        example_id: str,
        views: Mapping[str, np.ndarray],
        question: str,
        answer: str,
        metadata: dict[str, Any] | None = None,
        keep_images: bool = True,
    ) -> EncodedPrompt:
        """Encode all views of one example with one shared token layout.

        Raises:
            ValueError: the views produce different tokens (names the example and the view).
        """
        text = self.prompt_text(question)
        text_inputs: dict = {}
        vision: dict[str, dict] = {}
        for view, image in views.items():
            outputs = dict(self.processor(images=[image], text=[text], return_tensors="pt"))
            tokens = {key: outputs.pop(key)[0] for key in TEXT_KEYS if key in outputs}
            if not text_inputs:
                text_inputs = tokens
            elif not all(
                key in tokens and np.array_equal(tokens[key].numpy(), value.numpy())
                for key, value in text_inputs.items()
            ):
                raise ValueError(
                    f"example {example_id!r}: the {view!r} view produces a different token layout than the "
                    f"{ORIGINAL!r} view ({len(tokens['input_ids'])} vs {len(text_inputs['input_ids'])} tokens); "
                    "every perturbation must keep the image size"
                )
            vision[view] = outputs
        return EncodedPrompt(
            id=example_id,
            text_inputs=text_inputs,
            vision=vision,
            answer=answer,
            question=question,
            images=dict(views) if keep_images else {},
            metadata=metadata or {},
        )


def example_ids(ids: Sequence[Any] | None, prefix: str, count: int) -> list[str]:
    """String ids: the id column's values, or ``<prefix>-<row>``; duplicates get a ``#n`` suffix."""
    raw = (
        [str(value) for value in ids] if ids is not None else [f"{prefix}-{row:06d}" for row in range(count)]
    )
    seen: Counter = Counter()
    unique = []
    for value in raw:
        seen[value] += 1
        unique.append(value if seen[value] == 1 else f"{value}#{seen[value]}")
    return unique
