"""The ``cppo`` command: LightningCLI ``fit`` / ``validate`` / ``test``, and the project's own commands.

    cppo fit --config configs/demo/cppo.yaml
    cppo fit --config configs/demo/cppo.yaml --ckpt_path last   # continue the latest run, same folder
    cppo fit --resume runs/demo/cppo/version_0                  # continue that run, with its config.yaml
    cppo validate --config runs/demo/cppo/version_0/config.yaml --ckpt_path runs/demo/cppo/version_0/checkpoints/last.ckpt
    cppo demo                                   # the CPU demo: warm start, CPPO, held-out accuracy
    cppo study                                  # GRPO vs CPPO vs PAPO, several seeds, one table
    cppo warmstart --config configs/demo/warmstart.yaml --output runs/demo/warmstart
    cppo plot runs/grpo runs/cppo --output compare.png
    cppo export runs/demo/.../checkpoints/adapter merged-model/   # or .../checkpoints/last.ckpt (any mode)
    cppo export runs/.../checkpoints/last.ckpt model/   # a sharded FSDP2 checkpoint folder too
    cppo tiny qwen2_5_vl demo models/tiny-demo
    cppo audit --config configs/demo/cppo.yaml    # do I+ preserve and I- remove what the task needs?
    cppo predict --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt --output answers/

The data's processor is linked to the policy (``model.policy.model_name_or_path``), and the resolved
config is saved in the run folder, so every run can be reproduced from its own folder.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Before transformers/albumentations are imported.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # noqa: E402

from cppo_lightning.module import CPPOModule  # noqa: E402
from cppo_lightning.warmstart import WarmStartModule  # noqa: E402
from datamodules.vqa import VisualQADataModule  # noqa: E402


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
            for key, value in _leaves(model):
                try:
                    subparser.set_defaults({f"model.{key}": value})
                except KeyError:  # inside a class_path/init_args value: the whole value is one default
                    whole = model[key.split(".")[0]]
                    subparser.set_defaults({f"model.{key.split('.')[0]}": whole.as_dict()})
            self.config = self.parser.parse_args(self._arguments)
            # What resolve_checkpoint made of `--ckpt_path last` (a file) stays: parsing again undid it.
            self.config[subcommand].ckpt_path = ckpt_path
        used = self.config[subcommand].model
        stored = dict(_leaves(from_checkpoint[subcommand].model))
        self.hyperparameter_differences = [
            (f"model.{key}", stored[key], value)
            for key, value in _leaves(used)
            if key in stored and not _same_setting(key, stored[key], value)
        ]
        if self.hyperparameter_differences:
            lines = [
                f"  {key}: {_show(before)} in the checkpoint -> {_show(after)}"
                for key, before, after in self.hyperparameter_differences
            ]
            _say(
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
        from callbacks.run_lock import RunLock

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


# ---------------------------------------------------------------------------------------------- resuming
def _leaves(namespace) -> list[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf of a jsonargparse namespace (a ``class_path`` is a leaf)."""
    return list(namespace.items())


def _same_setting(key: str, stored, used) -> bool:
    """Whether a checkpoint's hyperparameter and the value used mean the same (import paths resolved)."""
    if key == "reward_functions":
        from cppo_lightning.rewards import DEFAULT_REWARDS

        stored, used = stored or DEFAULT_REWARDS, used or DEFAULT_REWARDS
    if key.endswith("class_path") and isinstance(stored, str) and isinstance(used, str):
        import importlib

        def resolve(path: str):
            module, _, name = path.rpartition(".")
            return getattr(importlib.import_module(module), name)

        try:
            return resolve(stored) is resolve(used)
        except (ImportError, AttributeError, ValueError):
            return stored == used
    return stored == used


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Resumption:
    """What ``--ckpt_path last`` / ``--resume`` resolved to.

    Attributes:
        run_dir: the run folder continued (None: no logger, or a new run).
        checkpoint: the checkpoint resumed from (None: none found, a new run starts).
        step: its global step.
        batches: training batches it had completed (metrics rows from later batches are dropped).
        passed_over: ``(file, reason)`` of incomplete checkpoints that were not used.
    """

    run_dir: Path | None = None
    checkpoint: Path | None = None
    step: int | None = None
    batches: int | None = None
    passed_over: list[tuple[Path, str]] = field(default_factory=list)


def resume_arguments(args: list[str]) -> tuple[list[str], Path | None]:
    """Take ``--resume RUN_DIR`` out of the arguments; add ``--config RUN_DIR/config.yaml`` if none is given.

    Raises:
        SystemExit: ``--resume`` outside ``fit``, or a run folder without ``config.yaml`` and no ``--config``.
    """
    resume, rest, index = None, [], 0
    while index < len(args):
        arg = args[index]
        if arg == "--resume" and index + 1 < len(args):
            resume, index = Path(args[index + 1]), index + 2
            continue
        if arg.startswith("--resume="):
            resume = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        index += 1
    if resume is None:
        return args, None
    if not rest or rest[0] != "fit":
        sys.exit("cppo: --resume RUN_DIR continues a training run: use it with `cppo fit`")
    if not resume.is_dir():
        sys.exit(f"cppo: --resume {resume}: no such run folder")
    if not any(arg == "--config" or arg.startswith("--config=") for arg in rest):
        config = resume / "config.yaml"
        if not config.is_file():
            sys.exit(f"cppo: --resume {resume}: the folder has no config.yaml; pass --config as well")
        rest = [rest[0], "--config", str(config), *rest[1:]]
    return rest, resume


def _loggers(config) -> list:
    """The logger entries (``class_path`` + ``init_args``) of a parsed trainer config."""
    logger = config.trainer.get("logger")
    entries = logger if isinstance(logger, list) else [logger]
    return [entry for entry in entries if hasattr(entry, "get") and entry.get("init_args") is not None]


def _run_root(logger) -> Path | None:
    """``save_dir/name`` of a logger entry (where its ``version_N`` folders are)."""
    init = logger.init_args
    save_dir = init.get("save_dir") or init.get("root_dir")
    if save_dir is None:
        return None
    name = init.get("name")
    return Path(save_dir) / name if name else Path(save_dir)


def _checkpoint_dirpath(config) -> Path | None:
    """A ``dirpath`` configured on a checkpoint callback, if any."""
    for callback in config.trainer.get("callbacks") or []:
        init = callback.get("init_args") if hasattr(callback, "get") else None
        if init is not None and "Checkpoint" in str(callback.get("class_path")) and init.get("dirpath"):
            return Path(init.dirpath)
    return None


def _version_number(folder: Path) -> int:
    suffix = folder.name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def _batches_done(checkpoint: Path) -> int | None:
    """Training batches a checkpoint had completed (the logger step its run continues at)."""
    from callbacks.checkpointing import load_metadata

    try:
        state = load_metadata(checkpoint)
        return int(state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"])
    except Exception:
        return None


def resolve_checkpoint(config, subcommand: str, resume: Path | None) -> Resumption | None:
    """Resolve ``ckpt_path: last`` (and ``--resume``) in a parsed subcommand config, in place.

    ``fit``: the newest run folder of the first logger that holds a complete checkpoint becomes the
    logger's ``version`` (same folder, same metrics file) and its newest complete checkpoint the
    ``ckpt_path``. ``validate``/``test``: ``last`` is the newest complete checkpoint of the newest run. An
    explicit ``ckpt_path`` is checked for completeness.

    Raises:
        SystemExit: an explicit checkpoint file that is incomplete (naming it and why).
    """
    from callbacks.checkpointing import checkpoint_problem, latest_checkpoint

    ckpt_path = config.get("ckpt_path")
    restarted = os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
    if subcommand == "fit" and ckpt_path is None and restarted:
        ckpt_path = "last"  # a requeued SLURM job continues where it was preempted
    if resume is None and ckpt_path != "last":
        if ckpt_path not in (None, "best", "hpc") and Path(ckpt_path).is_file():
            problem = checkpoint_problem(ckpt_path, verify_data=True)
            if problem is not None:
                newest = latest_checkpoint(Path(ckpt_path).parent).checkpoint
                hint = f"; the newest complete one there is {newest.path}" if newest else ""
                sys.exit(f"cppo: checkpoint {ckpt_path} is incomplete: {problem}{hint}")
        return None
    loggers = _loggers(config)
    root = _run_root(loggers[0]) if loggers else None
    dirpath = _checkpoint_dirpath(config)
    if resume is not None:
        runs = [resume]
    elif root is not None and root.is_dir():
        runs = sorted((p for p in root.glob("version_*") if p.is_dir()), key=_version_number, reverse=True)
    else:
        runs = []
    if not loggers and resume is None:
        runs = [Path(config.trainer.get("default_root_dir") or ".")]
    resumption = Resumption()
    for run in runs:
        found = latest_checkpoint(dirpath or run / "checkpoints")
        resumption.passed_over += [(c.path, c.problem) for c in found.passed_over]
        if found.checkpoint is not None:
            resumption.run_dir = run if loggers else None
            resumption.checkpoint = found.checkpoint.path
            resumption.step = found.checkpoint.step
            break
    for path, problem in resumption.passed_over:
        _say(f"checkpoint {path} is incomplete ({problem}); not using it")
    if resumption.checkpoint is None:
        where = resume or dirpath or root or "the default checkpoint folder"
        _say(f"no complete checkpoint found under {where}: starting a new run")
        config.ckpt_path = None
        return resumption
    config.ckpt_path = str(resumption.checkpoint)
    if subcommand == "fit":
        resumption.batches = _batches_done(resumption.checkpoint)
        if resumption.run_dir is not None:
            # The same run folder: Lightning's loggers take a string version as the folder name.
            for logger in loggers:
                if "version" in logger.init_args:
                    logger.init_args.version = resumption.run_dir.name
            if resume is not None and root is not None and resume.resolve().parent != root.resolve():
                loggers[0].init_args.save_dir = str(resume.parent.parent)
                loggers[0].init_args.name = resume.parent.name
        _say(
            f"resuming {resumption.run_dir or 'training'} from {resumption.checkpoint.name} "
            f"(global step {resumption.step}): same run folder and metrics file"
        )
    else:
        _say(f"{subcommand}: using {resumption.checkpoint} (global step {resumption.step})")
    return resumption


def _say(message: str) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(f"cppo: {message}", flush=True)


def continue_metrics(trainer, batches: int | None) -> None:
    """Keep a resumed run's ``metrics.csv``: its rows up to the checkpoint, to which the new rows are appended.

    Lightning's CSV writer deletes ``metrics.csv`` when its folder is not empty (it assumes a new run);
    rows logged after the checkpoint (steps the resumed run trains again) are dropped, not duplicated.
    """
    from lightning.pytorch.loggers import CSVLogger

    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            # Lightning's writer keeps its columns sorted and appends rows in that order.
            header, rows = sorted(reader.fieldnames or []), list(reader)
        kept = [
            row for row in rows if batches is None or not row.get("step") or int(float(row["step"])) < batches
        ]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = logger.experiment  # creating it removes the file
        with open(path, "w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=header)
            out.writeheader()
            out.writerows(kept)
        writer.metrics_keys = header
        _say(
            f"continuing {path}: {len(kept)} rows kept, {len(rows) - len(kept)} after the checkpoint dropped"
        )


def _cli(model_class: type, args: list[str] | None, run: bool, save_config: bool = True) -> CPPOLightningCLI:
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
    return _cli(CPPOModule, args, run)


def warmstart_cli(args: list[str] | None = None, run: bool = True) -> CPPOLightningCLI:
    """LightningCLI over the supervised :class:`WarmStartModule` (same data, same processor link)."""
    return _cli(WarmStartModule, args, run)


def _warmstart(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo warmstart", description="Supervised warm start; writes a checkpoint folder."
    )
    parser.add_argument(
        "--output", required=True, help="folder for the fine-tuned model (reused when up to date)"
    )
    options, rest = parser.parse_known_args(argv)
    print(warm_start(rest, options.output))
    return 0


# ---------------------------------------------------------------------------------------------- recipes


def warm_start(args: list[str], output: str | Path) -> Path:
    """Run the supervised warm start (``warmstart_cli`` arguments) and save the model to ``output``.

    Skipped when ``output`` already holds a warm start made from the same arguments and config text.
    """
    output = Path(output)
    stamp = hashlib.sha256(json.dumps([_config_texts(args), args]).encode()).hexdigest()
    marker = output / "warmstart.json"
    if marker.exists() and json.loads(marker.read_text()).get("stamp") == stamp:
        print(f"warm start: reusing {output} (made from the same config)")
        return output
    started = time.perf_counter()
    cli = warmstart_cli(["fit", *args])
    if cli.trainer.is_global_zero:
        cli.model.save_pretrained(output)
        marker.write_text(
            json.dumps({"stamp": stamp, "args": args, "seconds": time.perf_counter() - started})
        )
    return output


def _config_texts(args: list[str]) -> list[str]:
    """Contents of the config files named in ``args`` (a changed file invalidates a cached result)."""
    return [Path(args[i + 1]).read_text() for i, arg in enumerate(args[:-1]) if arg == "--config"]


def _held_out_accuracy(args: list[str], model_path: str | Path) -> float:
    """avg@k on the test split of a config, for the checkpoint at ``model_path`` (no adapter).

    Nothing is written: no logger, and no ``config.yaml`` (it would land in the working directory).
    """
    cli = _cli(
        CPPOModule,
        [
            "test",
            *args,
            "--model.policy.model_name_or_path",
            str(model_path),
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
        ],
        run=True,
        save_config=False,
    )
    return _avg_at_k(cli.trainer.callback_metrics, "test")


def _avg_at_k(metrics, stage: str) -> float:
    (key,) = [key for key in metrics if key.startswith(f"{stage}/avg@")]
    return float(metrics[key])


def _fit_and_test(args: list[str], model_path: str | Path) -> tuple[float, Path]:
    """Fit a config from ``model_path``, then avg@k of the trained policy on the test split."""
    cli = lightning_cli(["fit", *args, "--model.policy.model_name_or_path", str(model_path)])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return _avg_at_k(cli.trainer.callback_metrics, "test"), Path(cli.trainer.log_dir)


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo demo",
        description="The CPU demo: warm-start a tiny VLM on the synthetic task, train it with CPPO, "
        "report held-out avg@k before and after.",
    )
    parser.add_argument("--config", default="configs/demo/cppo.yaml", help="RL config")
    parser.add_argument("--warmstart-config", default="configs/demo/warmstart.yaml")
    parser.add_argument("--output", default="runs/demo", help="where runs, the warm start and the summary go")
    parser.add_argument(
        "--warmstart-args", default="", help="extra warm-start arguments, e.g. '--trainer.max_steps 20'"
    )
    parser.add_argument("--fit-args", default="", help="extra RL arguments, e.g. '--trainer.max_steps 5'")
    options = parser.parse_args(argv)
    output = Path(options.output)
    started = time.perf_counter()
    warm_args = [
        "--config",
        options.warmstart_config,
        "--trainer.logger.init_args.save_dir",
        str(output),
        *shlex.split(options.warmstart_args),
    ]
    warm = warm_start(warm_args, output / "warmstart" / "model")
    rl_args = [
        "--config",
        options.config,
        "--trainer.logger.init_args.save_dir",
        str(output),
        *shlex.split(options.fit_args),
    ]
    before = _held_out_accuracy(rl_args, warm)
    after, run = _fit_and_test(rl_args, warm)
    from callbacks.plots import plot_runs

    curves = plot_runs(
        [run], run / "curves.png", metrics=("train/reward_mean", "train/accuracy", "train/cpl")
    )
    summary = {
        "warm_start_avg_at_k": before,
        "trained_avg_at_k": after,
        "run": str(run),
        "curves": str(curves),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"held-out avg@k: warm start {before:.3f} -> after RL {after:.3f}  ({summary['seconds']:.0f} s)")
    print(
        f"run folder: {run}  (config.yaml, metrics.csv, checkpoints/, checkpoints/adapter, curves.png, perception/)"
    )
    return 0


def _study(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo study",
        description="GRPO vs CPPO vs PAPO from the same warm start: equal steps and rollouts, several seeds, "
        "held-out avg@k as a table (mean, std) and an overlaid plot.",
    )
    parser.add_argument("--objectives", default="grpo,cppo,papo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--warmstart-config", default="configs/demo/warmstart.yaml")
    parser.add_argument("--output", default="runs/study")
    parser.add_argument("--warmstart-args", default="")
    parser.add_argument("--fit-args", default="")
    parser.add_argument("--tag", default="", help="suffix of run names, table labels and result files")
    options = parser.parse_args(argv)
    output = Path(options.output)
    suffix = f"-{options.tag}" if options.tag else ""
    warm = warm_start(
        [
            "--config",
            options.warmstart_config,
            "--trainer.logger.init_args.save_dir",
            str(output),
            *shlex.split(options.warmstart_args),
        ],
        output / "warmstart" / "model",
    )
    results: dict[str, list[float]] = {}
    runs: dict[str, list[Path]] = {}
    for objective in options.objectives.split(","):
        for seed in options.seeds.split(","):
            args = [
                "--config",
                f"configs/demo/{objective}.yaml",
                "--trainer.logger.init_args.save_dir",
                str(output),
                "--trainer.logger.init_args.name",
                f"{objective}{suffix}-seed{seed}",
                "--seed_everything",
                seed,
                "--model.seed",
                seed,
                "--data.init_args.seed",
                seed,
                *shlex.split(options.fit_args),
            ]
            accuracy, run = _fit_and_test(args, warm)
            results.setdefault(objective + suffix, []).append(accuracy)
            runs.setdefault((objective + suffix).upper(), []).append(run)
            print(f"{objective} seed {seed}: held-out avg@k {accuracy:.3f}")
    baseline = _held_out_accuracy(
        ["--config", f"configs/demo/{options.objectives.split(',')[0]}.yaml", *shlex.split(options.fit_args)],
        warm,
    )
    from callbacks.plots import plot_groups, read_metrics

    metrics = {run: read_metrics(run) for group in runs.values() for run in group}
    first = next(iter(runs.values()))[0]
    validation = [key for key in metrics[first] if key.startswith("val/avg@")]
    plot = plot_groups(
        runs, output / f"study{suffix}.png", metrics=("train/accuracy", *validation), smooth=10
    )
    # What the auxiliary losses saw: their mean over each run (CPPO: divergences to I+ and I-).
    diagnostics = {
        label: {
            name: statistics.mean(float(metrics[run][name][1].mean()) for run in group)
            for name in (
                "train/cpl",
                "train/divergence_preserving",
                "train/divergence_removing",
                "train/perception_fraction",
                "train/implicit_perception_loss",
                "train/kl",
            )
            if all(name in metrics[run] for run in group)
        }
        for label, group in runs.items()
    }
    lines = [
        "| method | held-out avg@k (mean ± std) | per seed |",
        "|---|---|---|",
        f"| warm start | {baseline:.3f} | - |",
    ]
    for objective, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {objective.upper()} | {statistics.mean(values):.3f} ± {spread:.3f} | "
            + ", ".join(f"{v:.3f}" for v in values)
            + " |"
        )
    table = "\n".join(lines)
    (output / f"study{suffix}.md").write_text(table + "\n")
    summary = {"warm_start": baseline, "results": results, "diagnostics": diagnostics}
    (output / f"study{suffix}.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"plot: {plot}")
    return 0


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo export",
        description="Write a trained policy as a plain transformers folder (AutoModelForImageTextToText and "
        "AutoProcessor load it): a LoRA/QLoRA adapter merged into its base, or a full fine-tune as it is, from an "
        "adapter folder, a run folder or a training checkpoint (a .ckpt file or a sharded FSDP2 folder).",
    )
    parser.add_argument(
        "source",
        help="an adapter folder (checkpoints/adapter), a checkpoint (checkpoints/last.ckpt, a file or a sharded FSDP2 folder, any "
        "fine-tuning mode) or a run folder (its checkpoints/last.ckpt)",
    )
    parser.add_argument("output", help="folder for the exported model (new or empty)")
    parser.add_argument(
        "--dtype", default="float32", help="dtype of the written weights (float32, bfloat16, float16)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a folder that already holds files"
    )
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="from a LoRA checkpoint: write the PEFT adapter folder instead of the merged model",
    )
    options = parser.parse_args(argv)
    from cppo_lightning.export import ExportError, export

    try:
        print(
            export(
                options.source,
                options.output,
                dtype=options.dtype,
                overwrite=options.overwrite,
                adapter=options.adapter,
            )
        )
    except (ExportError, FileNotFoundError) as error:
        parser.error(str(error))
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


# ---------------------------------------------------------------------------------------------- evaluation

_EVAL_CONFIGS = Path(__file__).resolve().parent / "configs" / "eval"


def evaluate(
    models: dict[str, str],
    benchmarks: str | list[str] = "all",
    *,
    samples: int | None = None,
    max_new_tokens: int | None = None,
    max_samples: int | None = None,
    grader: str = "mathruler",
    output: str | Path = "runs/eval",
    config_dir: str | Path = _EVAL_CONFIGS,
    ckpt_path: str | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
) -> dict[str, list]:
    """The paper's evaluation of one or more models: ``cppo test`` over the benchmarks, one report.

    Runs ``configs/eval/protocol.yaml`` with the chosen benchmark configs of ``config_dir`` for each model,
    writes each model's report to ``output/<label>/`` and all of them, one row per model, to
    ``output/report.md`` and ``report.json``.

    Args:
        models: row label -> model (hub id or folder; a LoRA run: ``cppo export`` it first, or ``ckpt_path``).
        benchmarks: ``"all"`` or names (file stems or benchmark names), e.g. ``"mathvista,wemath"``.
        samples: ``k`` samples per question (default: the protocol's 8).
        max_new_tokens: completion limit (default: the protocol's 4,096).
        max_samples: evaluate only the first N questions of each benchmark (a quick look, not the protocol).
        grader: ``"mathruler"`` (the release's) or ``"math-verify"``.
        output: report folder.
        config_dir: folder with ``protocol.yaml`` and the benchmark configs.
        ckpt_path: a Lightning checkpoint to test (with a single model).
        extra_args: further LightningCLI arguments, e.g. ``["--trainer.devices", "8"]``.

    Returns:
        Row label -> its :class:`callbacks.evaluation.BenchmarkResult` list.

    Raises:
        ValueError: an unknown benchmark name or grader, or ``ckpt_path`` with several models.
    """
    import copy

    from callbacks.evaluation import EvaluationReport, write_report
    from cppo_lightning.graders import get_grader
    from datamodules.benchmarks import load_benchmark_configs, select_benchmarks

    config_dir = Path(config_dir)
    get_grader(grader)
    if ckpt_path is not None and len(models) != 1:
        raise ValueError("ckpt_path tests one model; give a single --model")
    chosen = copy.deepcopy(select_benchmarks(load_benchmark_configs(config_dir), benchmarks))
    if max_samples is not None:
        for entry in chosen:
            entry["source"]["max_samples"] = max_samples
    reward = "cppo_lightning.rewards." + (
        "math_verify_choice_accuracy_reward" if grader == "math-verify" else "choice_accuracy_reward"
    )
    output = Path(output)
    results, protocol, global_zero = {}, {}, True
    for label, model in models.items():
        args = [
            "--config",
            str(config_dir / "protocol.yaml"),
            "--model.policy.model_name_or_path",
            model,
            "--data.init_args.benchmarks",
            json.dumps(chosen),
            "--model.evaluation.reward",
            reward,
            *(["--model.evaluation.samples_per_question", str(samples)] if samples else []),
            *(["--model.evaluation.max_new_tokens", str(max_new_tokens)] if max_new_tokens else []),
            *extra_args,
        ]
        cli = _cli(CPPOModule, args, run=False, save_config=False)
        reports = [callback for callback in cli.trainer.callbacks if isinstance(callback, EvaluationReport)]
        if not reports:
            reports = [EvaluationReport()]
            cli.trainer.callbacks.append(reports[0])
        reports[0].output_dir, reports[0].label = output / _slug(label), label
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False)
        results[label] = reports[0].results
        evaluation = cli.model.evaluation
        protocol = {
            "samples_per_question": evaluation.samples_per_question,
            "temperature": evaluation.temperature,
            "top_p": evaluation.top_p,
            "max_new_tokens": evaluation.max_new_tokens,
            "grader": grader,
            "reward_function": reward,
            "max_samples_per_benchmark": max_samples,
        }
        global_zero = cli.trainer.is_global_zero
    if global_zero:
        write_report(results, output, protocol)
    return results


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_.") or "model"


def _evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo evaluate",
        description="The paper's evaluation: avg@k (k = 8, temperature 1.0) on its seven benchmarks, graded "
        "rule-based; a report (markdown + JSON) with avg@k +- std over the k samples, one row per model. "
        "Other arguments go to LightningCLI (e.g. --trainer.devices 8).",
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="hub id or folder; LABEL=PATH names its row; repeat to compare models",
    )
    parser.add_argument("--benchmarks", default="all", help="'all' or names, e.g. mathvista,wemath")
    parser.add_argument("--samples", type=int, default=None, help="k samples per question (protocol: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="completion limit (protocol: 4096)")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N questions of each")
    parser.add_argument("--grader", default="mathruler", choices=["mathruler", "math-verify"])
    parser.add_argument("--output", default="runs/eval", help="report folder")
    parser.add_argument(
        "--config-dir", default=str(_EVAL_CONFIGS), help="protocol.yaml and benchmark configs"
    )
    parser.add_argument("--ckpt-path", default=None, help="a Lightning checkpoint to test (one model)")
    options, extra = parser.parse_known_args(argv)
    models = {}
    for spec in options.model:
        label, separator, path = spec.partition("=")
        models[label if separator else spec] = path if separator else spec
    from datamodules.benchmarks import load_benchmark_configs, select_benchmarks

    try:
        select_benchmarks(load_benchmark_configs(options.config_dir), options.benchmarks)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    results = evaluate(
        models,
        options.benchmarks,
        samples=options.samples,
        max_new_tokens=options.max_new_tokens,
        max_samples=options.max_samples,
        grader=options.grader,
        output=options.output,
        config_dir=options.config_dir,
        ckpt_path=options.ckpt_path,
        extra_args=extra,
    )
    report = Path(options.output) / "report.md"
    if report.exists():
        print(report.read_text())
        print(f"report: {report} and {report.with_suffix('.json')}")
    return 0 if results else 1


# ---------------------------------------------------------------------------------------------- pool audit


def audit(
    args: list[str],
    output: str | Path | None = None,
    *,
    examples: int = 256,
    samples: int | None = None,
    batch_size: int | None = None,
    split: str = "train",
    candidates: str | Path | None = None,
    group_by: str | None = "family",
    device: str | None = None,
    rule=None,
    view_accuracy: bool = True,
    max_generate_rows: int | None = None,
):
    """Audit the perturbation pools of a training config before training (``cppo audit``).

    For the config's policy, data and pools: each transform of each pool on its own, the candidates and
    the flat-grey floor are scored on ``examples`` questions (accuracy as sampled avg@k; k3 and exact KL to
    the original on the completions sampled under it; entropy shifts; the CPL direction of every pair and
    of the pools as configured), given a verdict (:class:`cppo_lightning.audit.VerdictRule`), and written
    to ``output`` as ``audit.md``, ``audit.json`` and ``audit.html``.

    Args:
        args: LightningCLI arguments, as for ``fit`` (``["--config", "configs/demo/cppo.yaml", ...]``).
        output: report folder (default ``runs/audit/<config name>``).
        examples: questions audited (the first ones of the split).
        samples: completions per question and view (default: the rollout's ``G``).
        batch_size: prompts per batch (default: the data module's).
        split: ``train`` (where the pools act), ``val`` or ``test``.
        candidates: YAML file of candidate transforms (``preserving:`` / ``removing:`` lists).
        group_by: metadata column grouping the questions (None: none).
        device: ``cpu``, ``cuda`` ... (default: CUDA when available).
        rule: a :class:`~cppo_lightning.audit.VerdictRule` (default thresholds when None).
        view_accuracy: sample and grade under every view (False: under ``I`` only, divergences alone).
        max_generate_rows: rows per ``generate`` call (the views of a batch are stacked; None: all at once).

    Returns:
        ``(AuditResult, {"markdown", "json", "html"} -> path)``.
    """
    import torch

    from callbacks.audit_report import write_audit_report
    from cppo_lightning.audit import PoolAudit, VerdictRule, generation_token_ids
    from cppo_lightning.models import load_policy
    from cppo_lightning.objectives import CPPO
    from datamodules.pool_audit import audit_batches, audit_dataset, load_candidates

    started, started_cpu = time.perf_counter(), time.process_time()
    extra = candidates and load_candidates(candidates)
    cli = _cli(
        CPPOModule,
        [*args, "--trainer.logger", "false", "--trainer.callbacks", "[]"],
        run=False,
        save_config=False,
    )
    module, data = cli.model, cli.datamodule
    configs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--config"]
    name = Path(configs[-1]).stem if configs else "audit"
    output = Path(output) if output is not None else Path("runs") / "audit" / name
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = module.policy_config
    device_map = {"": target} if config.finetuning == "qlora" and target.type == "cuda" else None
    policy = load_policy(config, reference=False, device_map=device_map)
    if device_map is None:
        policy.to(target)
    policy.model.eval()
    dataset, maker = audit_dataset(data, extra or None, split)
    objective = module.objective
    cppo = objective if isinstance(objective, CPPO) else CPPO()  # a GRPO/PAPO config: CPPO's defaults
    tokenizer = policy.processor.tokenizer
    eos, pad = generation_token_ids(policy.model, tokenizer)
    runner = PoolAudit(
        policy.model,
        tokenizer,
        maker.views,
        grader=module.eval_grader,
        reward_model=module.rewards,
        rollout=module.rollout_config,
        samples=samples or module.rollout_config.samples_per_prompt,
        eos_token_ids=eos,
        pad_token_id=pad,
        top_ratio=cppo.top_ratio,
        tau=cppo.tau,
        advantage_gating=cppo.advantage_gating,
        advantage_scale=objective.advantage_scale,
        max_rows=module.update_config.micro_batch_rollouts,
        max_tokens=module.update_config.max_tokens_per_forward,
        chunk_tokens=module.update_config.logits_chunk_tokens,
        seed=module.seed,
        group_key=group_by,
        rule=rule or VerdictRule(),
        view_accuracy=view_accuracy,
        max_generate_rows=max_generate_rows,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_batch = batch_size or data.batch_size
    total = -(-min(examples, len(dataset)) // per_batch)
    for index, batch in enumerate(audit_batches(dataset, examples, per_batch, pad_id), start=1):
        runner.add(batch)
        # A line per batch: on a CPU the audit of the demo takes minutes.
        print(
            f"audit: batch {index}/{total} ({len(batch)} questions) at {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    result = runner.result(
        {
            "config": " ".join(configs),
            "model": config.model_name_or_path,
            "split": split,
            "grader": module.evaluation.reward,
            "objective": type(objective).__name__,
            "candidates": str(candidates) if candidates else None,
            "device": str(target),
            "seconds": round(time.perf_counter() - started, 1),
            # CPU time of this process (all its threads): on a shared machine, what the audit itself costs.
            "cpu_seconds": round(time.process_time() - started_cpu, 1),
        }
    )
    return result, write_audit_report(result, output, maker.configs)


def _audit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo audit",
        description="Audit the perturbation pools of a training config before training: does I+ preserve and "
        "I- remove what the task needs? Per transform (and the flat-grey floor): accuracy (sampled avg@k) with "
        "the image, the view and grey, k3 and exact KL to the original, entropy shifts, a verdict; the CPL "
        "direction of the pools as configured; proposed pools. Writes audit.md, audit.json and audit.html. "
        "Other arguments go to LightningCLI (e.g. --model.policy.model_name_or_path runs/demo/warmstart/model).",
    )
    parser.add_argument("--config", action="append", required=True, help="training config (as for fit)")
    parser.add_argument("--output", default=None, help="report folder (default runs/audit/<config name>)")
    parser.add_argument("--examples", type=int, default=256, help="questions audited")
    parser.add_argument(
        "--samples", type=int, default=None, help="completions per question and view (default G)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="prompts per batch (default: the data's)"
    )
    parser.add_argument("--split", default="train", choices=["train", "val", "test"])
    parser.add_argument(
        "--candidates", default=None, help="YAML with candidate 'preserving'/'removing' transforms"
    )
    parser.add_argument(
        "--group-by", default="family", help="metadata column grouping the questions ('' for none)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument(
        "--divergence-only",
        action="store_true",
        help="sample under I only (no accuracy under the views; verdicts from the divergences): for large models",
    )
    parser.add_argument(
        "--max-generate-rows",
        type=int,
        default=None,
        help="rows per generate call (the views of a batch are stacked into one; lower it on a GPU)",
    )
    from cppo_lightning.audit import VerdictRule

    defaults = VerdictRule()
    for name, help in (
        ("preserving_max", "an I+ transform is preserving up to this position (0 = identity, 1 = grey)"),
        ("removing_min", "an I- transform is removing from this position on"),
        ("min_accuracy_gap", "accuracy counts when acc(I) - acc(grey) is at least this"),
        ("min_floor_divergence", "KL counts when KL(grey) per token is at least this"),
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=float, default=getattr(defaults, name), help=help
        )
    options, extra = parser.parse_known_args(argv)
    args = [item for config in options.config for item in ("--config", config)] + extra
    result, paths = audit(
        args,
        options.output,
        examples=options.examples,
        samples=options.samples,
        batch_size=options.batch_size,
        split=options.split,
        candidates=options.candidates,
        group_by=options.group_by or None,
        device=options.device,
        view_accuracy=not options.divergence_only,
        max_generate_rows=options.max_generate_rows,
        rule=VerdictRule(
            options.preserving_max,
            options.removing_min,
            options.min_accuracy_gap,
            options.min_floor_divergence,
        ),
    )
    print(paths["markdown"].read_text())
    settings = result.settings
    print(
        f"audit of {settings['questions']} questions in {settings['seconds']:.0f} s "
        f"({settings['cpu_seconds']:.0f} s of CPU time; sampling {settings['seconds_sampling']:.0f} s, "
        f"scoring {settings['seconds_scoring']:.0f} s)"
    )
    print("report: " + ", ".join(str(path) for path in paths.values()))
    return 0


# ---------------------------------------------------------------------------------------------- predict


def predict(args: list[str], output: str | Path, ckpt_path: str | None = None) -> Path:
    """Sample answers for the test data of a config and write them as JSON lines (``cppo predict``).

    Every question of the config's test sources gets ``model.evaluation.samples_per_question`` completions
    at the evaluation temperature; ``output/samples.jsonl`` holds one line per question (benchmark, id,
    question, reference answer, completions, extracted answers, grades), beside ``report.md``/``.json``.

    Args:
        args: LightningCLI arguments (``["--config", "RUN/config.yaml", ...]``).
        output: folder to write.
        ckpt_path: a Lightning checkpoint of the policy (verified, then loaded onto the config's base).

    Returns:
        The ``samples.jsonl`` written.

    Raises:
        SystemExit: the config has no test data, or the checkpoint is incomplete or corrupt.
    """
    report = {"class_path": "callbacks.EvaluationReport", "init_args": {"output_dir": str(output)}}
    # `cppo test` with the report as its only callback: the checkpoint is verified and its hyperparameters
    # fill what the config leaves silent, as for test.
    cli = _cli(
        CPPOModule,
        [
            "test",
            *args,
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            json.dumps([report]),
            *(["--ckpt_path", str(ckpt_path)] if ckpt_path is not None else []),
        ],
        run=True,
        save_config=False,
    )
    if not cli.datamodule.eval_names["test"]:
        sys.exit("cppo predict: the config has no test data (data.init_args.test, or a test_size)")
    return Path(output) / "samples.jsonl"


def _predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo predict",
        description="Sample answers for the test data of a config (k per question, the evaluation settings) "
        "and write them as JSON lines (OUTPUT/samples.jsonl: id, question, answer, completions, extracted "
        "answers, grades). Other arguments go to LightningCLI (--config RUN/config.yaml, --data.init_args.test ...).",
    )
    parser.add_argument("--output", required=True, help="folder for samples.jsonl (and report.md/.json)")
    parser.add_argument(
        "--ckpt_path", "--ckpt-path", default=None, help="a checkpoint of the run to sample from"
    )
    options, extra = parser.parse_known_args(argv)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in extra):
        parser.error("give the config of the model and data: --config RUN/config.yaml (or a training config)")
    path = predict(extra, options.output, options.ckpt_path)
    with open(path) as handle:
        count = sum(1 for _ in handle)
    print(f"{path}: {count} questions")
    return 0


_COMMANDS = {
    "demo": _demo,
    "study": _study,
    "warmstart": _warmstart,
    "plot": _plot,
    "export": _export,
    "tiny": _tiny,
    "evaluate": _evaluate,
    "audit": _audit,
    "predict": _predict,
}

#: What ``cppo --help`` lists: every command, LightningCLI's and the project's.
_HELP = {
    "fit": "train (LightningCLI; --ckpt_path last / --resume RUN_DIR continue a run)",
    "validate": "avg@k on the validation data (LightningCLI)",
    "test": "avg@k on the test data (LightningCLI)",
    "predict": "sample answers for the test data, written as JSON lines",
    "demo": "the CPU demo: warm start, CPPO, held-out accuracy before and after",
    "study": "GRPO vs CPPO vs PAPO from one warm start, several seeds, one table",
    "warmstart": "supervised warm start; writes a model folder",
    "evaluate": "the paper's evaluation on its seven benchmarks (avg@k, a report)",
    "audit": "do the I+ / I- perturbation pools preserve / remove what the task needs?",
    "export": "a trained policy as a plain transformers folder (LoRA merged, or full)",
    "plot": "overlay the curves of several runs",
    "tiny": "build a tiny offline VLM folder",
}


def _print_help() -> None:
    width = max(len(name) for name in _HELP)
    lines = [
        "usage: cppo COMMAND [options]   (cppo COMMAND --help: the options of one command)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in _HELP.items()]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cppo`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return 0 if argv else 2
    if argv[0] in _COMMANDS:
        return _COMMANDS[argv[0]](argv[1:])
    lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
