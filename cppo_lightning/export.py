"""Export: a trained policy as a folder plain ``transformers`` loads (model + the base's own processor class).

Training loads image-only subclasses of some processors (Qwen2-VL ... Qwen3.5: no torchvision needed, see
:mod:`cppo_lightning.models.processors`). An exported folder must not name them: ``AutoProcessor`` does not
know them and returns a bare tokenizer. So the processor is written as the transformers class it derives
from, with the video processor configuration that class expects (the base's own, or derived from the image
processor's), and ``AutoProcessor`` loads it wherever transformers' own dependencies (torchvision for a
video processor) are installed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from cppo_lightning.models.loading import Policy, resolve_model_path, torch_dtype

# Image processor settings a video processor of the same family shares.
_SHARED_WITH_VIDEO = (
    "do_convert_rgb",
    "do_normalize",
    "do_rescale",
    "do_resize",
    "image_mean",
    "image_std",
    "merge_size",
    "patch_size",
    "resample",
    "rescale_factor",
    "size",
    "temporal_patch_size",
)


class ExportError(ValueError):
    """An export that would not give a usable folder, or would overwrite what it reads."""


def transformers_class(processor) -> type:
    """The transformers class a processor is (or derives from): what an exported folder names."""
    for cls in type(processor).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls
    return type(processor)


def _base_video_config(base: str | None) -> dict | None:
    """The base checkpoint's own video processor configuration, if its folder is on this machine."""
    if base is None:
        return None
    try:
        folder = Path(resolve_model_path(base))
    except Exception:
        return None
    nested = folder / "processor_config.json"
    if nested.is_file():
        video = json.loads(nested.read_text()).get("video_processor")
        if video:
            return video
    legacy = folder / "video_preprocessor_config.json"
    return json.loads(legacy.read_text()) if legacy.is_file() else None


def _video_processor_type(output: Path, base: str | None, image: dict) -> str:
    """The video processor class transformers pairs with the model type (Qwen2.5-VL: Qwen2VLVideoProcessor)."""
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    model_type = None
    if (output / "config.json").is_file():
        model_type = json.loads((output / "config.json").read_text()).get("model_type")
    elif base is not None:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(resolve_model_path(base)).model_type
    names = VIDEO_PROCESSOR_MAPPING_NAMES.get(model_type) if model_type else None
    if names:
        name = next(iter(names.values())) if isinstance(names, dict) else names
        if name:
            return name
    return str(image.get("image_processor_type", "")).replace("ImageProcessor", "VideoProcessor")


def save_processor(processor, output: str | Path, base: str | None = None) -> Path:
    """Save ``processor`` to ``output`` as its transformers class, loadable by ``AutoProcessor``.

    Args:
        processor: the (possibly image-only) processor used in training.
        output: the export folder.
        base: the base checkpoint (its video processor configuration is reused when it has one).

    Returns:
        ``output``.
    """
    output = Path(output)
    processor.save_pretrained(output)
    own = transformers_class(processor)
    if own is type(processor):
        return output
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = output / name
        if path.is_file():
            config = json.loads(path.read_text())
            if "processor_class" in config:
                config["processor_class"] = own.__name__
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    attributes = own.get_attributes() if hasattr(own, "get_attributes") else []
    path = output / "processor_config.json"
    if "video_processor" in attributes and path.is_file():
        config = json.loads(path.read_text())
        if not config.get("video_processor"):
            video = _base_video_config(base)
            if video is None:
                # Images only were trained: the video processor shares the image processor's settings.
                image = config.get("image_processor") or processor.image_processor.to_dict()
                video = {key: image[key] for key in _SHARED_WITH_VIDEO if key in image}
                video["video_processor_type"] = _video_processor_type(output, base, image)
            config["video_processor"] = video
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return output


def check_output(output: str | Path, sources: list[str | Path], overwrite: bool = False) -> Path:
    """Refuse an export folder that is one of its inputs, or that already holds files (unless ``overwrite``).

    Raises:
        ExportError: naming the folder and what to do.
    """
    output = Path(output)
    target = Path(os.path.realpath(output))
    for source in sources:
        if source is not None and Path(os.path.realpath(source)) == target:
            raise ExportError(
                f"the output {str(output)!r} is the export's input {str(source)!r}: choose another folder"
            )
    if output.exists() and not output.is_dir():
        raise ExportError(f"the output {str(output)!r} is a file, not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(
            f"the output folder {str(output)!r} is not empty: choose an empty or new folder, or pass --overwrite "
            "to write over its files"
        )
    return output


def merge_adapter_folder(
    adapter: str | Path, output: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Merge a PEFT adapter folder (as written by ``CPPOModule.save_adapter``) into its base model.

    The base named in the adapter's ``adapter_config.json`` is loaded unquantized (so QLoRA adapters
    merge exactly), the adapter applied and merged, and model + processor saved to ``output``.

    Args:
        adapter: folder with ``adapter_config.json`` and the adapter weights (and the processor).
        output: folder to write (new or empty, unless ``overwrite``).
        dtype: dtype of the merged weights.
        overwrite: write into a folder that already holds files.

    Returns:
        ``output``.

    Raises:
        FileNotFoundError: ``adapter`` is not an adapter folder.
        ExportError: ``output`` is the adapter or base folder, or not empty.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from cppo_lightning.models.processors import load_processor

    adapter, output = Path(adapter), Path(output)
    config_file = adapter / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(
            f"{adapter} has no adapter_config.json: not a PEFT adapter folder (a full fine-tuning run exports "
            "from its checkpoint: cppo export RUN/checkpoints/last.ckpt OUTPUT)"
        )
    base_name = json.loads(config_file.read_text())["base_model_name_or_path"]
    base_path = resolve_model_path(base_name)
    check_output(output, [adapter, base_path], overwrite)
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch_dtype(dtype))
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(output)
    save_processor(load_processor(base_name), output, base_name)
    return output


def merge_adapter(
    policy: Policy, output: str | Path, dtype: str = "float32", overwrite: bool = True, state_dict=None
) -> Path:
    """Merge a live policy's adapter into a fresh copy of its base and save it (training state untouched).

    Args:
        state_dict: the policy's whole weights when they are sharded (gathered by the caller).
    """
    with tempfile.TemporaryDirectory() as folder:
        policy.model.save_pretrained(folder, state_dict=state_dict)
        policy.processor.save_pretrained(folder)
        with torch.no_grad():
            return merge_adapter_folder(folder, output, dtype=dtype, overwrite=overwrite)


def export(
    source: str | Path,
    output: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    adapter: bool = False,
) -> Path:
    """``cppo export``: an adapter folder, a run's checkpoint (a file, or a sharded FSDP2 folder), or a run
    folder (its ``last.ckpt``).

    Raises:
        FileNotFoundError: ``source`` is none of those.
        ExportError: see :func:`check_output`.
    """
    source = Path(source)
    if source.is_file() or (source / "meta.pt").is_file():
        return export_checkpoint(source, output, dtype, overwrite, adapter)
    if (source / "adapter_config.json").is_file():
        return merge_adapter_folder(source, output, dtype, overwrite)
    for candidate in (source / "last.ckpt", source / "checkpoints" / "last.ckpt"):
        if candidate.exists():
            return export_checkpoint(candidate, output, dtype, overwrite, adapter)
    raise FileNotFoundError(
        f"{source} is not an adapter folder (adapter_config.json), a checkpoint (file or sharded folder), or "
        "a run folder with checkpoints/last.ckpt: nothing to export"
    )


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
    path: str | Path,
    output: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    adapter: bool = False,
) -> Path:
    """Turn a training checkpoint (a file, or a sharded FSDP2 folder) into a folder ``transformers`` loads.

    The policy is rebuilt from the checkpoint's hyperparameters on the base it records (the base check
    applies), the trained tensors loaded into it, and it is written as a plain model folder: under LoRA the
    adapter merged into the unquantized base, unless ``adapter`` asks for the PEFT adapter folder instead; a
    full fine-tune as it is. ``dtype`` is the written weights' dtype (an adapter keeps its own).

    Raises:
        ValueError: ``adapter`` for a fully fine-tuned checkpoint; a checkpoint without hyperparameters.
        KeyError: the checkpoint lacks tensors the policy trains.
        ExportError: ``output`` is the checkpoint, its base, or a folder that is not empty.
    """
    from cppo_lightning.module import CPPOModule

    path, output = Path(path), Path(output)
    metadata, state = checkpoint_state_dict(path)
    hyperparameters = dict(metadata.get("hyper_parameters") or {})
    if not hyperparameters:
        raise ValueError(f"{path} records no hyperparameters: not a CPPOModule checkpoint")
    base = (metadata.get("cppo") or {}).get("model_name_or_path") or hyperparameters["policy"][
        "model_name_or_path"
    ]
    check_output(output, [path, resolve_model_path(base)], overwrite)
    # No reference policy: only the trained weights are exported.
    hyperparameters["objective"] = {
        "class_path": "cppo_lightning.objectives.GRPO",
        "init_args": {"beta": 0.0},
    }
    module = CPPOModule(**hyperparameters)
    module.configure_model()
    module.on_load_checkpoint({**metadata, "state_dict": state})
    module.load_state_dict(state, strict=False)
    if adapter:
        return module.save_adapter(output)
    if module.policy.uses_adapters:
        return merge_adapter(module.policy, output, dtype=dtype, overwrite=True)
    module.policy.model.to(torch_dtype(dtype)).save_pretrained(output)
    save_processor(module.policy.processor, output, base)
    return output
