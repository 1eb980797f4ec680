"""Checkpoints that are complete or absent, and finding the latest complete one of a run.

:class:`AtomicCheckpoint` is Lightning's ``ModelCheckpoint`` with one change: every file is written to a
temporary file beside its target (the same folder, hence the same file system), flushed to disk, and
renamed over the target. A write that fails part-way (disk full, ``kill -9``) leaves the previous
checkpoint as it was; no truncated file ever carries a checkpoint's name. Callbacks that define
``on_checkpoint_written(trainer, pl_module, filepath)`` (:class:`~callbacks.AdapterExport`) are called
after, and only after, the file is complete.

:func:`latest_checkpoint` is what ``cppo fit --ckpt_path last`` / ``--resume`` use: the newest complete
checkpoint of a folder, passing over (and naming) incomplete ones.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

log = logging.getLogger(__name__)

#: Temporary files are hidden (``.last.ckpt.tmp-<pid>``) so that neither Lightning's ``last*.ckpt`` lookup
#: nor :func:`latest_checkpoint` ever mistakes one for a checkpoint.
_TEMPORARY_MARK = ".tmp-"
#: Lightning's file of everything but the shards in a sharded checkpoint folder.
SHARDED_METADATA = "meta.pt"


def temporary_path(target: str | Path) -> Path:
    """The temporary file a checkpoint is written to before it is renamed to ``target``."""
    target = Path(target)
    return target.with_name(f".{target.name}{_TEMPORARY_MARK}{os.getpid()}")


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk too (POSIX).
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory descriptors
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def commit(temporary: str | Path, target: str | Path) -> None:
    """Flush ``temporary`` to disk and rename it over ``target`` (atomic on POSIX file systems)."""
    temporary, target = Path(temporary), Path(target)
    if temporary.is_file():
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    else:  # a sharded checkpoint (a folder: FSDP2, DeepSpeed): the old one goes only once the new one is in
        for path in sorted(temporary.rglob("*")):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.replace(target, retired)
        os.replace(temporary, target)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync_folder(target.parent)


def save_atomically(trainer: pl.Trainer, filepath: str | Path, weights_only: bool = False) -> Path:
    """``trainer.save_checkpoint`` through a temporary file beside ``filepath``; call it on every rank.

    Raises:
        OSError: the write failed (the temporary file is removed and ``filepath`` is untouched).
    """
    filepath = Path(filepath)
    temporary = temporary_path(filepath)
    try:
        trainer.save_checkpoint(temporary, weights_only)
        if trainer.is_global_zero:
            commit(temporary, filepath)
    except BaseException:
        if trainer.is_global_zero and temporary.exists():
            shutil.rmtree(temporary) if temporary.is_dir() else temporary.unlink()
        raise
    return filepath


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Delete what interrupted writes left in ``folder`` (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in [*folder.glob(f".*{_TEMPORARY_MARK}*"), *folder.glob(".*.old-*")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def _local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files are complete or absent (every argument is ``ModelCheckpoint``'s).

    Each checkpoint goes to ``.<name>.tmp-<pid>`` in its own folder, is fsynced and renamed; then callbacks
    with ``on_checkpoint_written`` run (the adapter export). Left-over temporary files of an interrupted
    run are removed at set-up. Remote paths (``s3://`` ...) are written the way ``ModelCheckpoint`` writes.
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and _local(self.dirpath):
            for path in remove_temporary_files(self.dirpath):
                log.warning("removed %s, left by an interrupted checkpoint write", path)

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not _local(filepath):
            super()._save_checkpoint(trainer, filepath)
        else:
            save_atomically(trainer, filepath, self.save_weights_only)
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))
        for callback in trainer.callbacks:
            written = getattr(callback, "on_checkpoint_written", None)
            if callable(written):
                written(trainer, trainer.lightning_module, filepath)

    def save_resumable(self, trainer: pl.Trainer) -> str:
        """Save a checkpoint of the current state now (``last.ckpt`` when ``save_last``); call on every rank.

        Returns:
            The path written.
        """
        candidates = self._monitor_candidates(trainer)
        if self.save_last:
            self._save_last_checkpoint(trainer, candidates)
            return self.last_model_path
        filepath = self.format_checkpoint_name(candidates, "last")
        self._save_checkpoint(trainer, filepath)
        return filepath


# --------------------------------------------------------------------------------------- finding one to resume


def checkpoint_problem(path: str | Path, verify_data: bool = False) -> str | None:
    """Why ``path`` is not a complete, intact ``torch.save`` checkpoint, or None when it is.

    Without ``verify_data`` it is cheap even for large files: a torch checkpoint is a zip archive whose
    directory is written last, so a truncated file has none; the tensors are not read. With
    ``verify_data`` every member (tensor data included) is read and checked against the CRC-32 that
    ``torch.save`` records for it in the archive (``zipfile.testzip``): flipped bytes inside a tensor,
    which ``torch.load`` accepts silently, are found. That reads the whole file (about 1 GB/s).
    """
    path = Path(path)
    if path.is_dir():
        # A sharded checkpoint (torch distributed checkpoint, as Lightning's ModelParallelStrategy writes it):
        # the shards' index (.metadata) and Lightning's meta.pt are written after every shard.
        absent = [name for name in (".metadata", SHARDED_METADATA) if not (path / name).is_file()]
        if absent:
            return f"incomplete sharded checkpoint (no {', '.join(absent)})"
        return checkpoint_problem(path / SHARDED_METADATA)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            size = path.stat().st_size
            if not any(name.endswith("data.pkl") for name in names):
                return "not a torch checkpoint (no data.pkl in the archive)"
            ends = [info.header_offset + info.compress_size for info in archive.infolist()]
            if ends and max(ends) > size:
                return f"truncated: members end at byte {max(ends)} of a {size}-byte file"
            if verify_data:
                damaged = archive.testzip()
                if damaged is not None:
                    return f"corrupt: the data of {damaged!r} does not match its recorded checksum (CRC-32)"
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"truncated or corrupt ({type(error).__name__}: {error})"
    return None


def checkpoint_step(path: str | Path) -> tuple[int | None, int | None]:
    """``(global_step, epoch)`` recorded in a checkpoint (memory-mapped: tensors are not read)."""
    try:
        checkpoint = load_metadata(path)
    except Exception:  # a checkpoint with pickled classes: still usable, its step unknown here
        return None, None
    return checkpoint.get("global_step"), checkpoint.get("epoch")


def load_metadata(path: str | Path) -> dict:
    """A checkpoint's contents without reading tensors: the file (memory-mapped), or a sharded checkpoint's
    ``meta.pt`` (everything but the model and optimizer shards)."""
    path = Path(path)
    if path.is_dir():
        path = path / SHARDED_METADATA
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


@dataclass
class Candidate:
    """A checkpoint file found in a run, and whether it can be resumed from."""

    path: Path
    step: int | None = None
    epoch: int | None = None
    problem: str | None = None


@dataclass
class Found:
    """The checkpoint to resume from, and the newer ones passed over because they were incomplete."""

    checkpoint: Candidate | None
    passed_over: list[Candidate] = field(default_factory=list)


def latest_checkpoint(folder: str | Path, verify_data: bool = True) -> Found:
    """The newest complete checkpoint (``*.ckpt``) in ``folder``: highest global step, then newest file.

    Incomplete files (truncated, not an archive) are returned in ``passed_over``; so is a newer file whose
    tensor data fails its checksums (``verify_data``: only the files up to the chosen one are read in full).
    """
    folder = Path(folder)
    candidates = []
    for path in sorted(folder.glob("*.ckpt")) if folder.is_dir() else []:
        problem = checkpoint_problem(path)
        step, epoch = checkpoint_step(path) if problem is None else (None, None)
        candidates.append(Candidate(path, step, epoch, problem))
    complete = [c for c in candidates if c.problem is None]
    # Unknown steps sort first; among equal steps the newest file wins (last.ckpt is written after the
    # step-named file of the same step).
    complete.sort(key=lambda c: (c.step if c.step is not None else -1, c.path.stat().st_mtime))
    chosen = None
    while complete and chosen is None:
        newest = complete.pop()
        newest.problem = checkpoint_problem(newest.path, verify_data=True) if verify_data else None
        if newest.problem is None:
            chosen = newest
    return Found(chosen, [c for c in candidates if c.problem is not None])
