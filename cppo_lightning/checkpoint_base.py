"""What a checkpoint records about the base model it was trained on, and the check when it is loaded.

Under LoRA/QLoRA a checkpoint holds only the adapters: applied to another base they load without a
single missing key and silently compute something else. So every checkpoint records its base (the name
or path it was loaded from, a fingerprint of the weight files, the fine-tuning mode), and loading it onto
a policy whose base differs is an error naming both, unless explicitly allowed.

The fingerprint hashes the weight files' names and sizes and 16 evenly spaced 64 KiB slices of each
(about 1 MiB per shard, whatever the model's size): independent of the dtype or quantization the base is
loaded with, cheap for a 7B model, and different for any fine-tune of the same architecture (whose
training changes nearly every byte, while the safetensors headers alone would be identical).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_SLICES = 16
_SLICE_BYTES = 64 * 1024


class BaseMismatchError(ValueError):
    """A checkpoint trained on one base model loaded onto a policy with another."""


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a ``from_pretrained`` folder (safetensors first, else PyTorch pickles)."""
    folder = Path(folder)
    for pattern in _WEIGHT_PATTERNS:
        files = sorted(path for path in folder.glob(pattern) if path.is_file())
        if files:
            return files
    return []


def local_model_folder(model_name_or_path: str, revision: str | None = None) -> Path | None:
    """The local folder holding a model's files: the folder itself, a built ``tiny:`` model, or the hub cache.

    Returns None when the files are nowhere on this machine (nothing is downloaded).
    """
    from cppo_lightning.models.tiny import is_tiny_spec, resolve_tiny_spec

    if is_tiny_spec(model_name_or_path):
        return Path(resolve_tiny_spec(model_name_or_path))
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model_name_or_path,
                revision=revision,
                local_files_only=True,
                allow_patterns=["*.safetensors", "*.bin", "*.json"],
            )
        )
    except Exception:  # not cached, not a hub id, hub library missing: no fingerprint
        return None


def weights_fingerprint(model_name_or_path: str, revision: str | None = None) -> str | None:
    """A short hash identifying the base weights (see the module docstring), or None if they are not local."""
    folder = local_model_folder(model_name_or_path, revision)
    files = weight_files(folder) if folder is not None else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size};".encode())
        with open(path, "rb") as handle:
            for index in range(_SLICES):
                handle.seek(max(0, (size - _SLICE_BYTES) * index // (_SLICES - 1)))
                digest.update(handle.read(_SLICE_BYTES))
    return digest.hexdigest()[:16]


def base_record(model_name_or_path: str, finetuning: str, revision: str | None = None) -> dict[str, Any]:
    """What a checkpoint stores about its base (plain data, loadable with ``weights_only=True``)."""
    return {
        "model_name_or_path": str(model_name_or_path),
        "revision": revision,
        "fingerprint": weights_fingerprint(str(model_name_or_path), revision),
        "finetuning": finetuning,
    }


def _describe(record: dict[str, Any]) -> str:
    fingerprint = record.get("fingerprint") or "unknown"
    return f"{record.get('model_name_or_path')!r} (weights {fingerprint}, {record.get('finetuning')})"


def check_base(saved: dict[str, Any] | None, current: dict[str, Any], allow_mismatch: bool = False) -> None:
    """Refuse a checkpoint trained on another base, or in an incompatible fine-tuning mode.

    LoRA and QLoRA adapters of the same base are interchangeable (QLoRA only quantizes the frozen base);
    adapters and full fine-tuning are not.

    Args:
        saved: the checkpoint's :func:`base_record` (None: a checkpoint written before bases were recorded).
        current: the loading policy's record.
        allow_mismatch: load it anyway (a warning instead of the error).

    Raises:
        BaseMismatchError: the bases or the fine-tuning modes differ (the message names both).
    """
    if not saved:
        log.warning(
            "this checkpoint does not record its base model: it cannot be checked against %s",
            _describe(current),
        )
        return
    problems = []
    known = saved.get("fingerprint") and current.get("fingerprint")
    if known and saved["fingerprint"] != current["fingerprint"]:
        problems.append("other base weights")
    elif not known and saved.get("model_name_or_path") != current.get("model_name_or_path"):
        problems.append("another base model")
    adapters = {"lora", "qlora"}
    modes = {saved.get("finetuning"), current.get("finetuning")}
    if len(modes) == 2 and not modes <= adapters:
        problems.append("another fine-tuning mode")
    if not problems:
        if saved.get("model_name_or_path") != current.get("model_name_or_path"):
            log.info(
                "checkpoint base %s has the same weights as %s",
                saved["model_name_or_path"],
                current["model_name_or_path"],
            )
        return
    message = (
        f"this checkpoint was trained on {_describe(saved)} but the policy is {_describe(current)} "
        f"({', '.join(problems)}). Load it onto the base it was trained on "
        f"(--model.policy.model_name_or_path {saved.get('model_name_or_path')}), or set "
        "allow_base_mismatch (--model.allow_base_mismatch true) to load it anyway."
    )
    if allow_mismatch:
        log.warning("allow_base_mismatch: %s", message)
        return
    raise BaseMismatchError(message)


__all__ = ["BaseMismatchError", "base_record", "check_base", "weights_fingerprint"]
