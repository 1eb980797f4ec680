"""Checking, cleaning and encoding examples.

Every example is checked once at set-up; a bad one is a *counted skip* with its reason and id, logged and
summarised, or (``strict``) an error naming it. Never a silent drop: the reference release silently
dropped every prompt longer than 512 tokens including image tokens, i.e. every large image. Here image
size is capped in pixels instead, and the prompt limit only catches genuinely long prompts.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
    both sides are multiples of ``factor``; an image smaller than one patch is upscaled. The DataModule
    takes ``factor`` and the default bounds from the architecture table
    (:meth:`cppo_lightning.architectures.Architecture.image_sizing`): patch x merge for
    dynamic-resolution models (28 for Qwen2.5-VL, 32 for Qwen3-VL and Qwen3.5), 1 for models whose
    processor resizes to a fixed size or tiles (LLaVA, Gemma 3, Idefics3).
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


def open_image(value: Any, image_root: Path | None = None, allow_outside_root: bool = False) -> Image.Image:
    """Decode one image value: a PIL image, bytes, ``{"bytes", "path"}``, a path, or a list of one of those.

    Args:
        value: the image column's value.
        image_root: folder relative paths are resolved against; paths must stay inside it.
        allow_outside_root: accept paths that resolve outside ``image_root`` (``../``, absolute paths).

    Raises:
        ExampleError: no image, several images, a path outside ``image_root``, or an unreadable/corrupt one.
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
                image = Image.open(_resolve(value["path"], image_root, allow_outside_root))
            else:
                raise ExampleError("no image")
        elif isinstance(value, (str, Path)):
            if not str(value).strip():
                raise ExampleError("no image")
            image = Image.open(_resolve(value, image_root, allow_outside_root))
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
    return upright(image)


_ORIENTATION = 0x0112  # the EXIF tag a camera writes instead of rotating the pixels


def upright(image: Image.Image) -> Image.Image:
    """``image`` as it is meant to be seen: rotated/mirrored by its EXIF orientation (a phone photo's
    orientation 6 is stored sideways). Images without an orientation tag are returned as they are."""
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: the pixels are still usable as stored
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _resolve(path: str | Path, root: Path | None, allow_outside_root: bool = False) -> Path:
    given = path
    path = Path(path).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    if root is not None and not allow_outside_root:
        # Lexically, without following links: a dataset's "../../" must not reach files outside its
        # image folder, while a symlinked image folder inside it stays usable.
        inside = Path(os.path.normpath(os.path.abspath(path)))
        folder = Path(os.path.normpath(os.path.abspath(root)))
        if not inside.is_relative_to(folder):
            raise ExampleError(
                "image outside image_root",
                f"{str(given)!r} resolves to {str(inside)!r}, outside image_root {str(folder)!r} "
                "(set allow_outside_image_root: true on the source to accept it)",
            )
    if not path.exists():
        raise ExampleError("unreadable image", f"file {str(path)!r} does not exist")
    return path


def _require_text(value: Any, field_name: str) -> None:
    if isinstance(value, (Mapping, list, tuple, set)):
        shown = json.dumps(value, default=str)
        raise ExampleError(
            "not text",
            f"field {field_name!r} holds a {type(value).__name__} ({shown[:80]}), not text: map the column "
            "that holds the text (source.columns) or flatten it",
        )


def clean_question(question: Any, field_name: str = "question") -> str:
    """The question text without ``<image>`` placeholders (the chat template places the image).

    Raises:
        ExampleError: a dict or list where text is expected (its string form would be trained on).
    """
    if question is None:
        return ""
    _require_text(question, field_name)
    return _PLACEHOLDER.sub("", str(question)).strip()


def image_tags(question: Any) -> int:
    """Number of ``<image>`` placeholders (``<image>``, ``<image 1>``, ``<image1>``) in a question."""
    return 0 if question is None else len(_PLACEHOLDER.findall(str(question)))


def check_image_tags(question: Any, images: int = 1) -> None:
    """A question may name its image once, or not at all (the chat template places it).

    Raises:
        ExampleError: more tags than images: the question refers to pictures the example does not have.
    """
    tags = image_tags(question)
    if tags not in (0, images):
        raise ExampleError(
            "image tags do not match images",
            f"the question has {tags} <image> tags but the example has {images} image{'s' * (images != 1)}",
        )


def clean_answer(answer: Any, field_name: str = "answer") -> str:
    """The reference answer as a string (a list of one answer, or of copies of one, is unwrapped).

    Raises:
        ExampleError: a list of several different answers (the rewards grade one verifiable answer).
    """
    if isinstance(answer, (list, tuple)):
        distinct = list(dict.fromkeys(str(item).strip() for item in answer if item is not None))
        distinct = [item for item in distinct if item]
        if len(distinct) > 1:
            raise ExampleError(
                "several answers",
                f"field {field_name!r} holds {len(distinct)} different answers {distinct[:5]}: one verifiable "
                "answer per example is expected (keep one, or write a reward function that accepts any)",
            )
        answer = distinct[0] if distinct else None
    if answer is None:
        return ""
    _require_text(answer, field_name)
    return str(answer).strip()


#: What ``special_tokens_in_text`` may be: skip the example, or escape the tokens so that they are text.
SPECIAL_TOKEN_POLICIES = ("skip", "escape")

# Inserted after a special token's first character: the string no longer matches the token, so the
# tokenizer reads it as ordinary text (its bytes are the original ones plus this invisible character).
_ZERO_WIDTH_SPACE = "\u200b"


def special_token_strings(tokenizer) -> list[str]:
    """Every special token of ``tokenizer`` as text (chat-template and vision markers included), longest first."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            tokens.add(str(token.content))
    return sorted((token for token in tokens if token), key=len, reverse=True)


def special_token_pattern(tokens: Sequence[str]) -> re.Pattern | None:
    """One regular expression matching any of ``tokens`` (longest first), or None for no tokens.

    One pass over a text whatever the number of tokens (some tokenizers mark thousands as special).
    """
    tokens = sorted(set(tokens), key=len, reverse=True)
    return re.compile("|".join(re.escape(token) for token in tokens)) if tokens else None


def escape_special_tokens(text: str, tokens: Sequence[str] | re.Pattern | None) -> str:
    """``text`` with every occurrence of ``tokens`` broken by a zero-width space, so it tokenizes as text."""
    pattern = tokens if isinstance(tokens, re.Pattern) or tokens is None else special_token_pattern(tokens)
    if pattern is None:
        return text
    return pattern.sub(lambda match: match.group(0)[0] + _ZERO_WIDTH_SPACE + match.group(0)[1:], text)


@dataclass
class SkipReport:
    """Counted skips of one data source: counts per reason, the first few ids, and every skip in full.

    Attributes:
        source: ``<stage>:<source name>``.
        total: examples seen.
        counts: reason -> skipped examples.
        examples: reason -> the first few ids (for the summary line).
        converted: image mode -> examples converted to RGB (among the kept ones).
        entries: one dict per skipped example (``source``, ``id``, ``row``, ``reason``, ``detail``): what
            ``skipped.jsonl`` holds.
        logged_per_reason: at most this many warning lines per reason; the rest is in the summary and
            ``skipped.jsonl``.
        longest_prompt: ``(tokens, id)`` of the longest prompt among the kept examples.
    """

    source: str
    total: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    converted: Counter = field(default_factory=Counter)
    entries: list[dict[str, Any]] = field(default_factory=list)
    logged_per_reason: int = 3
    #: ``(tokens, example id)`` of the longest prompt kept (what the model's context must hold).
    longest_prompt: tuple[int, str] = (0, "")

    def add(self, reason: str, example_id: str, detail: str = "", row: int | None = None) -> None:
        """Count one skipped example; log it while its reason has had fewer than ``logged_per_reason`` lines."""
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(example_id)
        self.entries.append(
            {"source": self.source, "id": example_id, "row": row, "reason": reason, "detail": detail}
        )
        if self.counts[reason] <= self.logged_per_reason:
            where = f" (row {row})" if row is not None else ""
            text = f"{reason}: {detail}" if detail else reason
            log.warning("skipping %s: example %r%s: %s", self.source, example_id, where, text)
            if self.counts[reason] == self.logged_per_reason:
                log.warning(
                    "%s: further %r skips are counted, not logged (see the summary and skipped.jsonl)",
                    self.source,
                    reason,
                )

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    @property
    def fraction(self) -> float:
        """Skipped share of the examples seen."""
        return self.skipped / self.total if self.total else 0.0

    def log_summary(self) -> None:
        """The summary line: at WARNING when anything was skipped (a user must see data loss), else INFO."""
        log.log(logging.WARNING if self.counts else logging.INFO, self.summary())

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


def write_skipped(path: str | Path, reports: Sequence[SkipReport]) -> Path:
    """Write every skipped example of ``reports`` to ``path`` as JSON lines (replacing the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        for report in reports:
            for entry in report.entries:
                handle.write(json.dumps(entry) + "\n")
    os.replace(temporary, path)
    return path


class PromptEncoder:
    """Turns a checked example into model inputs for every image view.

    Args:
        processor: the policy's processor.
        prompt_template: format string with ``{question}``.
        system_prompt: optional system message.
        limits: image pixel limits.
        max_prompt_tokens: longest allowed prompt, image tokens included (None: no limit).
        special_tokens_in_text: a question, answer or choice that contains one of the tokenizer's special
            tokens (``<|im_end|>``, ``<|image_pad|>`` ...) is skipped (``"skip"``), or the tokens are escaped
            so that they are plain text (``"escape"``). Left live, they would forge chat turns or image slots.
    """

    def __init__(
        self,
        processor,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        system_prompt: str | None = None,
        limits: ImageLimits | None = None,
        max_prompt_tokens: int | None = None,
        special_tokens_in_text: str = "skip",
    ) -> None:
        if special_tokens_in_text not in SPECIAL_TOKEN_POLICIES:
            raise ValueError(
                f"special_tokens_in_text must be one of {SPECIAL_TOKEN_POLICIES}, got {special_tokens_in_text!r}"
            )
        self.processor = processor
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.limits = limits or ImageLimits()
        self.max_prompt_tokens = max_prompt_tokens
        self.special_tokens_in_text = special_tokens_in_text
        tokenizer = getattr(processor, "tokenizer", processor)
        self.special_tokens = special_token_strings(tokenizer)
        self._image_placeholders: int | None = None

    @property
    def special_tokens(self) -> list[str]:
        """The tokenizer's special tokens that may not appear in a question, answer or choice."""
        return self._special_tokens

    @special_tokens.setter
    def special_tokens(self, tokens: Sequence[str]) -> None:
        self._special_tokens = list(tokens)
        self._special_pattern = special_token_pattern(self._special_tokens)

    def text(self, value: str, field_name: str) -> str:
        """A question, answer or choice checked for special tokens: escaped, or refused.

        Raises:
            ExampleError: it contains special tokens and ``special_tokens_in_text`` is ``"skip"``.
        """
        matches = self._special_pattern.findall(value) if self._special_pattern is not None else []
        if not matches:
            return value
        found = list(dict.fromkeys(matches))  # in the order they appear
        if self.special_tokens_in_text == "escape":
            return escape_special_tokens(value, self._special_pattern)
        raise ExampleError(
            "special tokens in text",
            f"field {field_name!r} contains the tokenizer's special tokens {found} (they would act as chat or "
            "image markers, not text); set data.special_tokens_in_text: escape to train on them as text",
        )

    def prompt_text(self, question: str) -> str:
        """The chat-templated prompt for one question (special tokens in it escaped under ``"escape"``)."""
        from cppo_lightning.models import chat_prompt

        if self.special_tokens_in_text == "escape":
            question = escape_special_tokens(question, self._special_pattern)
        return chat_prompt(self.processor, self.prompt_template.format(question=question), self.system_prompt)

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Number of image tokens the processor will insert for an image of ``(width, height)``.

        Raises:
            ExampleError: the processor refuses the image size (e.g. Qwen's aspect ratio limit of 200).
        """
        try:
            data = self.processor._get_num_multimodal_tokens(image_sizes=[[size[1], size[0]]])
            return int(data["num_image_tokens"][0])
        except (AttributeError, KeyError, TypeError, NotImplementedError):
            return 0
        except ValueError as error:
            raise ExampleError(
                "image size refused by the processor", f"{size[0]} x {size[1]} image: {error}"
            ) from None

    def _placeholders(self, text_ids: Sequence[int]) -> int:
        placeholder = getattr(self.processor, "image_token_id", None)
        return sum(1 for token in text_ids if token == placeholder) if placeholder is not None else 0

    def check(self, question: str, image: Image.Image) -> int:
        """Prompt length in tokens (text + image) of a resized image, after checking its token layout.

        Raises:
            ExampleError: the prompt is longer than ``max_prompt_tokens``, holds another number of image
                placeholders than the template places for one image, or the processor refuses the image.
        """
        text_ids = self.processor.tokenizer(self.prompt_text(question))["input_ids"]
        if self._image_placeholders is None:
            neutral = self.processor.tokenizer(self.prompt_text("?"))["input_ids"]
            self._image_placeholders = self._placeholders(neutral)
        found = self._placeholders(text_ids)
        if found != self._image_placeholders:
            # Training would stop at this row with "image features and image tokens do not match".
            raise ExampleError(
                "image tokens in text",
                f"the prompt holds {found} image placeholder tokens where the template places "
                f"{self._image_placeholders} for the one image",
            )
        image_tokens = self.image_tokens(image.size)
        length = len(text_ids) + image_tokens
        if image_tokens:
            # The processor replaces the template's image placeholder by the image tokens: not counted twice.
            length -= found
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
        if self.special_tokens_in_text == "escape":
            answer = escape_special_tokens(answer, self._special_pattern)
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
