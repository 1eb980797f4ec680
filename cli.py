"""The ``cppo`` command: LightningCLI ``fit`` / ``validate`` / ``test``, plus ``plot``, ``export``, ``tiny``.

    cppo fit --config configs/demo/cppo.yaml
    cppo validate --config configs/demo/cppo.yaml --ckpt_path runs/demo/.../last.ckpt
    cppo plot runs/grpo runs/cppo --output compare.png
    cppo export runs/demo/.../checkpoints/adapter merged-model/
    cppo tiny qwen2_5_vl demo models/tiny-demo

The data's processor is linked to the policy (``model.policy.model_name_or_path``), and the resolved
config is saved in the run folder, so every run can be reproduced from its own folder.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before transformers/albumentations are imported.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from cppo_lightning.module import CPPOModule  # noqa: E402
from datamodules.vqa import VisualQADataModule  # noqa: E402


class CPPOLightningCLI(LightningCLI):
    """LightningCLI with the data's processor tied to the policy checkpoint."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.policy.model_name_or_path", "data.init_args.processor_name_or_path")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> CPPOLightningCLI:
    """Build (and by default run) the LightningCLI; ``args`` as on the command line, e.g. ``["fit", "--config", ...]``."""
    return CPPOLightningCLI(
        CPPOModule,
        VisualQADataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cppo export", description="Merge a LoRA adapter folder into its base model.")
    parser.add_argument("adapter", help="adapter folder (written beside the checkpoints as 'adapter')")
    parser.add_argument("output", help="folder for the merged model")
    parser.add_argument("--dtype", default="float32", help="dtype of the merged weights (float32, bfloat16, float16)")
    options = parser.parse_args(argv)
    from cppo_lightning.export import merge_adapter_folder

    print(merge_adapter_folder(options.adapter, options.output, dtype=options.dtype))
    return 0


def _tiny(argv: list[str]) -> int:
    from cppo_lightning.models.tiny import ARCHITECTURES, SIZES, build_tiny_vlm

    parser = argparse.ArgumentParser(prog="cppo tiny", description="Build a tiny offline VLM folder.")
    parser.add_argument("architecture", choices=ARCHITECTURES)
    parser.add_argument("size", choices=sorted(SIZES))
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    print(build_tiny_vlm(options.output, options.architecture, options.size, options.seed))
    return 0


def _plot(argv: list[str]) -> int:
    from callbacks.plots import main as plot_main

    return plot_main(argv)


_COMMANDS = {"plot": _plot, "export": _export, "tiny": _tiny}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cppo`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _COMMANDS:
        return _COMMANDS[argv[0]](argv[1:])
    lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
