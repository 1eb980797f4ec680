"""The project's LightningCLI: the data's processor tied to the policy checkpoint, runs that resume.

``cppo fit``/``validate``/``test`` run :class:`CPPOLightningCLI` over :class:`~cppo_lightning.CPPOModule`
and any :class:`~datamodules.VisualQADataModule`; ``cppo warmstart`` runs it over the supervised
:class:`~cppo_lightning.warmstart.WarmStartModule`. Every recipe builds its runs with :func:`build_cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from cppo_lightning.module import CPPOModule
from cppo_lightning.warmstart import WarmStartModule
from datamodules.vqa import VisualQADataModule
from recipes.resume import (
    Resumption,
    continue_metrics,
    leaves,
    resolve_checkpoint,
    resume_arguments,
    same_setting,
    say,
    short_repr,
)

__all__ = ["CPPOLightningCLI", "build_cli", "lightning_cli", "warmstart_cli"]


class CPPOLightningCLI(LightningCLI):
    """LightningCLI with the data's processor tied to the policy checkpoint, and runs that resume.

    ``fit --ckpt_path last`` continues the newest run of the configured logger (``save_dir/name/version_N``)
    in its own folder and metrics file, from its newest *complete* checkpoint; ``fit --resume RUN_DIR``
    continues the run in ``RUN_DIR`` (with its ``config.yaml`` unless ``--config`` is given). A SLURM restart
    (a requeued job) counts as ``--ckpt_path last``. What was resumed is printed and kept in ``resumption``.
    """

    resumption: Resumption | None = None

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands but ``predict`` (``cppo predict`` is the project's own command)."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.policy.model_name_or_path", "data.init_args.processor_name_or_path")

    #: ``(key, checkpoint value, value used)`` of every model hyperparameter in which the checkpoint
    #: differs from what the run uses (filled when a checkpoint is given).
    hyperparameter_differences: list[tuple[str, object, object]] = []

    def parse_arguments(self, parser, args) -> None:
        resume = None
        self._arguments = None
        if not isinstance(args, dict) and not hasattr(args, "as_dict"):
            args, resume = resume_arguments(list(sys.argv[1:] if args is None else args))
            self._arguments = args
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            # Before LightningCLI reads the checkpoint's hyperparameters: it must read the resolved file.
            self.resumption = resolve_checkpoint(self.config[subcommand], subcommand, resume)

    def _parse_ckpt_path(self) -> None:
        """Reconcile the checkpoint's hyperparameters with what the user wrote; list every difference.

        Lightning's own rule (the checkpoint's ``hyper_parameters`` replace the model config) would make
        ``fit --config cppo.yaml --ckpt_path grpo.ckpt`` train GRPO and hide a different base model from the
        base check. Here ``fit`` uses the config and command line as written (the checkpoint contributes
        weights and training state only); ``validate``/``test`` (and ``cppo predict``) take the checkpoint's values
        where the config and command line are silent (they are the defaults the arguments are parsed over).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        import torch

        state = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        hparams = dict(state.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        written = self.config
        try:
            from_checkpoint = self.parser.parse_object({subcommand: {"model": hparams}}, written.clone())
        except SystemExit:
            sys.stderr.write(f"cppo: the hyperparameters of {ckpt_path} do not parse\n")
            raise
        if subcommand != "fit" and self._arguments is not None:
            # The checkpoint's values become the defaults; the config files and options parse over them.
            subparser = self.parser._subcommands_action._name_parser_map[subcommand]
            model = from_checkpoint[subcommand].model
            for key, value in leaves(model):
                try:
                    subparser.set_defaults({f"model.{key}": value})
                except KeyError:  # inside a class_path/init_args value: the whole value is one default
                    whole = model[key.split(".")[0]]
                    subparser.set_defaults({f"model.{key.split('.')[0]}": whole.as_dict()})
            self.config = self.parser.parse_args(self._arguments)
            # What resolve_checkpoint made of `--ckpt_path last` (a file) stays: parsing again undid it.
            self.config[subcommand].ckpt_path = ckpt_path
        used = self.config[subcommand].model
        stored = dict(leaves(from_checkpoint[subcommand].model))
        self.hyperparameter_differences = [
            (f"model.{key}", stored[key], value)
            for key, value in leaves(used)
            if key in stored and not same_setting(key, stored[key], value)
        ]
        if self.hyperparameter_differences:
            lines = [
                f"  {key}: {short_repr(before)} in the checkpoint -> {short_repr(after)}"
                for key, before, after in self.hyperparameter_differences
            ]
            say(
                f"{subcommand} uses the config and command line where they differ from the hyperparameters "
                f"saved in {ckpt_path}:\n" + "\n".join(lines)
            )

    run_lock = None

    def before_instantiate_classes(self) -> None:
        """Refuse Lightning's FSDP1 strategy before the trainer exists (with a GPU it would start and fail later)."""
        from cppo_lightning.sharding import FSDP1_MESSAGE, is_fsdp1

        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand is not None else self.config
        strategy = config.get("trainer", {}).get("strategy")
        name = strategy.get("class_path") if hasattr(strategy, "get") else strategy
        if isinstance(name, str) and is_fsdp1(name):
            sys.exit(f"cppo: {FSDP1_MESSAGE}")

    def before_fit(self) -> None:
        """Lock the run folder (one writer), then keep a resumed run's metrics file (Lightning's CSV writer
        deletes it in an existing folder)."""
        from recipes.run_lock import RunLock

        if self.trainer.loggers and self.trainer.is_global_zero and self.trainer.log_dir:
            self.run_lock = RunLock(self.trainer.log_dir).acquire()
        if self.resumption is not None and self.resumption.checkpoint is not None:
            continue_metrics(self.trainer, self.resumption.batches)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:  # also when the run fails or is preempted: a process that goes on may start another run
            if self.run_lock is not None:
                self.run_lock.release()
                self.run_lock = None


def build_cli(
    model_class: type, args: list[str] | None, run: bool, save_config: bool = True
) -> CPPOLightningCLI:
    """The project's LightningCLI over ``model_class`` and any :class:`VisualQADataModule`.

    Args:
        model_class: :class:`CPPOModule` or :class:`WarmStartModule`.
        args: as on the command line (None: ``sys.argv``).
        run: run the subcommand (False: only parse and instantiate).
        save_config: write the resolved ``config.yaml`` into the run folder (False: nothing is written).
    """
    return CPPOLightningCLI(
        model_class,
        VisualQADataModule,
        subclass_mode_data=True,
        save_config_callback=SaveConfigCallback if save_config else None,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def lightning_cli(args: list[str] | None = None, run: bool = True) -> CPPOLightningCLI:
    """Build (and by default run) the LightningCLI.

    Args:
        args: as on the command line, e.g. ``["fit", "--config", "configs/demo/cppo.yaml"]``.
        run: run the subcommand (False: only parse and instantiate).
    """
    return build_cli(CPPOModule, args, run)


def warmstart_cli(args: list[str] | None = None, run: bool = True) -> CPPOLightningCLI:
    """LightningCLI over the supervised :class:`WarmStartModule` (same data, same processor link)."""
    return build_cli(WarmStartModule, args, run)
