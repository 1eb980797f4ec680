"""Processor loading that works without torchvision.

``AutoProcessor.from_pretrained`` on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 checkpoint wants a video
processor, which needs torchvision; without it, it either fails or silently returns only the tokenizer.
Training here uses images only, so for the model types the architecture table names an image-only
processor for, that subclass of the real processor is loaded, with the PIL image processor. Every other
model type goes through ``AutoProcessor`` (which picks the PIL image processors without torchvision), and
the result is checked to be a real multimodal processor.
"""

from __future__ import annotations

import importlib
import logging
import os
import re

from transformers import AutoConfig, AutoProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from cppo_lightning.architectures import architecture

log = logging.getLogger(__name__)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL (and Qwen2-VL) processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL (and Qwen3.5) processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


def _image_only_class(model_type: str):
    """The architecture table's image-only processor class for a model type, or None (AutoProcessor)."""
    path = architecture(model_type).processor
    if path is None:
        return None
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def load_processor(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Load the multimodal processor of a checkpoint (hub id or local folder, or a ``tiny:`` spec).

    Args:
        name_or_path: what ``from_pretrained`` accepts, or ``tiny:<architecture>-<size>``.
        revision: hub revision.
        trust_remote_code: passed to ``transformers``.

    Returns:
        A processor with ``tokenizer`` and ``image_processor`` attributes.

    Raises:
        ValueError: the checkpoint has no image processor (a text-only model).
    """
    from cppo_lightning.models.loading import resolve_model_path

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    processor_class = _image_only_class(config.model_type)
    if processor_class is not None:
        # The image processor backend is chosen by availability: the PIL one without torchvision.
        processor = processor_class.from_pretrained(path, revision=revision)
    else:
        processor = AutoProcessor.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            f"{name_or_path!s} has no image processor (loaded {type(processor).__name__}): "
            "it is not a vision-language checkpoint, or its processor config is missing"
        )
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    # Prompts of different lengths are padded on the left so every completion starts at the same column.
    processor.tokenizer.padding_side = "left"
    return processor


def chat_prompt(processor, question: str, system_prompt: str | None = None) -> str:
    """The prompt text for one image and one question, through the checkpoint's chat template.

    Args:
        processor: a loaded processor (its chat template is used).
        question: the user's text, shown after the image.
        system_prompt: optional system message.

    Returns:
        The rendered prompt, ending with the assistant turn's opening.
    """
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return without_opened_think(prompt)


# A generation prompt that already opens the reasoning block (Qwen3.5 and the Qwen3 "thinking" templates
# end with "<|im_start|>assistant\n<think>\n").
_OPENED_THINK = re.compile(r"<think>\s*$")


def without_opened_think(prompt: str) -> str:
    """The prompt without a trailing ``<think>`` that the chat template wrote into the generation prompt.

    The release's format reward (and the instruction in every prompt) wants the completion itself to
    open ``<think>``: with the tag in the prompt, no completion would ever earn it. The model, trained
    to think after that tag, writes it itself.
    """
    match = _OPENED_THINK.search(prompt)
    if match is None:
        return prompt
    if "think" not in _logged:
        _logged.add("think")
        log.info("the chat template opens <think> in the prompt; it is removed so that completions open it")
    return prompt[: match.start()]


_logged: set[str] = set()
