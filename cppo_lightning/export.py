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


def checkpoint_state_dict(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A training checkpoint's metadata and model tensors, in one process.

    Reads a ``.ckpt`` file, or a sharded checkpoint folder (torch distributed checkpoint, as Lightning's
    ``ModelParallelStrategy`` writes it under FSDP2): there only the model's tensors are read, whole (the
    shards of every rank put together), not the optimizer's.

    Returns:
        ``(metadata, state_dict)``: the checkpoint without its tensors (hyperparameters, loops...) and the
        module's tensors by name (``policy.model...``).
    """
    path = Path(path)
    if not path.is_dir():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return checkpoint, checkpoint.pop("state_dict")
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    prefix = "state_dict."
    state = {
        key.removeprefix(prefix): torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in stored.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    load({"state_dict": state}, checkpoint_id=path, no_dist=True)
    return metadata, state


def export_checkpoint(
    path: str | Path, output: str | Path, adapter: bool = False, dtype: str = "float32"
) -> Path:
    """Turn a training checkpoint (a file, or a sharded FSDP2 folder) into a folder ``transformers`` loads.

    The policy is rebuilt from the checkpoint's hyperparameters (its base from where it was trained), the
    trained tensors loaded into it, and it is written as a plain model folder: under LoRA the adapter is
    merged into the base, unless ``adapter`` asks for the PEFT adapter folder instead. ``dtype`` is the
    written weights' dtype (the merged or fully fine-tuned model; an adapter keeps its own).

    Raises:
        ValueError: ``adapter`` for a fully fine-tuned checkpoint; a checkpoint without hyperparameters.
        KeyError: the checkpoint lacks tensors the policy trains.
    """
    from cppo_lightning.module import CPPOModule

    metadata, state = checkpoint_state_dict(path)
    hyperparameters = metadata.get("hyper_parameters")
    if not hyperparameters:
        raise ValueError(f"{path} records no hyperparameters: not a CPPOModule checkpoint")
    module = CPPOModule(**hyperparameters)
    module.configure_model()
    module.on_load_checkpoint({**metadata, "state_dict": state})
    module.load_state_dict(state, strict=False)
    if adapter:
        return module.save_adapter(output)
    if module.policy.uses_adapters:
        return merge_adapter(module.policy, output, dtype=dtype)
    module.policy.model.to(torch_dtype(dtype)).save_pretrained(output)
    module.policy.processor.save_pretrained(output)
    return Path(output)
