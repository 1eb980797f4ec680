"""Export: merge a LoRA adapter into its base model, as a folder plain ``transformers`` loads."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from cppo_lightning.models.loading import Policy, resolve_model_path, torch_dtype


def merge_adapter_folder(adapter: str | Path, output: str | Path, dtype: str = "float32") -> Path:
    """Merge a PEFT adapter folder (as written by ``CPPOModule.save_adapter``) into its base model.

    The base named in the adapter's ``adapter_config.json`` is loaded unquantized (so QLoRA adapters
    merge exactly), the adapter applied and merged, and model + processor saved to ``output``.

    Args:
        adapter: folder with ``adapter_config.json`` and the adapter weights (and the processor).
        output: folder to write.
        dtype: dtype of the merged weights.

    Returns:
        ``output``.

    Raises:
        FileNotFoundError: ``adapter`` is not an adapter folder.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from cppo_lightning.models.processors import load_processor

    adapter, output = Path(adapter), Path(output)
    config_file = adapter / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{adapter} has no adapter_config.json: not a PEFT adapter folder")
    base_name = json.loads(config_file.read_text())["base_model_name_or_path"]
    base = AutoModelForImageTextToText.from_pretrained(
        resolve_model_path(base_name), dtype=torch_dtype(dtype)
    )
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(output)
    load_processor(base_name).save_pretrained(output)
    return output


def merge_adapter(policy: Policy, output: str | Path, dtype: str = "float32", state_dict=None) -> Path:
    """Merge a live policy's adapter into a fresh copy of its base and save it (training state untouched).

    Args:
        state_dict: the policy's whole weights when they are sharded (gathered by the caller).
    """
    with tempfile.TemporaryDirectory() as folder:
        policy.model.save_pretrained(folder, state_dict=state_dict)
        policy.processor.save_pretrained(folder)
        with torch.no_grad():
            return merge_adapter_folder(folder, output, dtype=dtype)
