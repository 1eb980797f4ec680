"""Loading VLM policies (LoRA / QLoRA / full), their processors, tiny offline VLMs, and scoring."""

from cppo_lightning.models.loading import (
    LANGUAGE_MODEL_TARGETS,
    LoRAConfig,
    Policy,
    PolicyConfig,
    load_model,
    load_policy,
    load_policy_on,
    lora_target_names,
    resolve_model_path,
    vision_tower,
)
from cppo_lightning.models.processors import ImageOnlyQwen2_5_VLProcessor, chat_prompt, load_processor
from cppo_lightning.models.scoring import LanguageModelHead, completion_mask, score_positions
from cppo_lightning.models.tiny import SIZES, build_tiny_vlm, resolve_tiny_spec

__all__ = [
    "LANGUAGE_MODEL_TARGETS",
    "SIZES",
    "ImageOnlyQwen2_5_VLProcessor",
    "LanguageModelHead",
    "LoRAConfig",
    "Policy",
    "PolicyConfig",
    "build_tiny_vlm",
    "chat_prompt",
    "completion_mask",
    "load_model",
    "load_policy",
    "load_policy_on",
    "load_processor",
    "lora_target_names",
    "resolve_model_path",
    "resolve_tiny_spec",
    "score_positions",
    "vision_tower",
]
