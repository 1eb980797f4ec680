"""Write the LoRA adapter in PEFT format (with the processor) after every complete checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
from typing_extensions import override

log = logging.getLogger(__name__)


class AdapterExport(pl.Callback):
    """Keep ``<checkpoint dir>/adapter`` (PEFT adapter + processor) in step with the latest checkpoint.

    The folder loads with ``PeftModel.from_pretrained(base, folder)``, and ``cppo export`` merges it into
    the base model. Full fine-tuning has no adapter: the callback writes the whole model instead
    (``save_pretrained``) when ``full_model`` is set, and nothing otherwise.

    With :class:`~callbacks.AtomicCheckpoint` the folder is written only after a checkpoint file is complete
    (a failed checkpoint write leaves the previous adapter in place), into a temporary folder that then
    replaces the old one. With a plain ``ModelCheckpoint`` it is written while the checkpoint is assembled,
    as before, and may then be ahead of a checkpoint whose write failed.

    Args:
        dirname: folder name beside the checkpoints.
        full_model: under full fine-tuning, write the whole model (large) at every checkpoint.
    """

    def __init__(self, dirname: str = "adapter", full_model: bool = False) -> None:
        self.dirname = dirname
        self.full_model = full_model
        self._after_write = False

    def folder(self, trainer: pl.Trainer) -> Path:
        """Where the adapter goes: beside the checkpoints, else in the run folder."""
        checkpoint = trainer.checkpoint_callback
        base = getattr(checkpoint, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
        return Path(base) / self.dirname

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from callbacks.checkpointing import AtomicCheckpoint

        self._after_write = any(isinstance(callback, AtomicCheckpoint) for callback in trainer.callbacks)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from cppo_lightning.sharding import is_sharded

        policy = getattr(pl_module, "policy", None)
        if policy is None or not (policy.uses_adapters or self.full_model):
            return
        if not trainer.is_global_zero:
            if is_sharded(policy.model):  # gathering the shards is a collective: every rank takes part
                pl_module.save_adapter("unused") if policy.uses_adapters else pl_module.save_pretrained(
                    "unused"
                )
            return
        folder = self.folder(trainer)
        staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if policy.uses_adapters:
                pl_module.save_adapter(staging)
            else:
                pl_module.save_pretrained(staging)
            # Two renames: the old folder stays complete until the new one is.
            retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            if folder.exists():
                os.replace(folder, retired)
            os.replace(staging, folder)
            shutil.rmtree(retired, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("wrote %s at step %d", folder, trainer.global_step)

    def on_checkpoint_written(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, filepath: str
    ) -> None:
        """Called by :class:`~callbacks.AtomicCheckpoint` once ``filepath`` is complete on disk."""
        self._export(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if not self._after_write:
            self._export(trainer, pl_module)
