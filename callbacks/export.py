"""Write the LoRA adapter in PEFT format (with the processor) whenever Lightning saves a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from typing_extensions import override

log = logging.getLogger(__name__)


class AdapterExport(pl.Callback):
    """Keep ``<checkpoint dir>/adapter`` (PEFT adapter + processor) in step with the latest checkpoint.

    The folder loads with ``PeftModel.from_pretrained(base, folder)``, and ``cppo export`` merges it into
    the base model. Full fine-tuning has no adapter: the callback writes the whole model instead
    (``save_pretrained``) when ``full_model`` is set, and nothing otherwise.

    Args:
        dirname: folder name beside the checkpoints.
        full_model: under full fine-tuning, write the whole model (large) at every checkpoint.
    """

    def __init__(self, dirname: str = "adapter", full_model: bool = False) -> None:
        self.dirname = dirname
        self.full_model = full_model

    def folder(self, trainer: pl.Trainer) -> Path:
        """Where the adapter goes: beside the checkpoints, else in the run folder."""
        checkpoint = trainer.checkpoint_callback
        base = getattr(checkpoint, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
        return Path(base) / self.dirname

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if not trainer.is_global_zero:
            return
        policy = getattr(pl_module, "policy", None)
        if policy is None:
            return
        folder = self.folder(trainer)
        if policy.uses_adapters:
            pl_module.save_adapter(folder)
        elif self.full_model:
            policy.model.save_pretrained(folder)
            policy.processor.save_pretrained(folder)
        else:
            return
        log.info("wrote %s at step %d", folder, trainer.global_step)
