"""Resuming a run: ``fit --ckpt_path last``, ``fit --resume RUN_DIR`` and a requeued SLURM job.

Which run folder is continued, from which checkpoint (the newest *complete* one: incomplete files are named
and passed over), and how the run's ``metrics.csv`` is kept (Lightning's CSV writer deletes it in a folder
that is not empty). :class:`~recipes.lightning_cli.CPPOLightningCLI` calls these while it parses.
"""

from __future__ import annotations

import csv
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Resumption",
    "continue_metrics",
    "leaves",
    "resolve_checkpoint",
    "resume_arguments",
    "same_setting",
    "say",
    "short_repr",
]


def leaves(namespace) -> list[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf of a jsonargparse namespace (a ``class_path`` is a leaf)."""
    return list(namespace.items())


def same_setting(key: str, stored, used) -> bool:
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


def short_repr(value) -> str:
    """``repr(value)``, cut to 80 characters."""
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
        say(f"checkpoint {path} is incomplete ({problem}); not using it")
    if resumption.checkpoint is None:
        where = resume or dirpath or root or "the default checkpoint folder"
        say(f"no complete checkpoint found under {where}: starting a new run")
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
        say(
            f"resuming {resumption.run_dir or 'training'} from {resumption.checkpoint.name} "
            f"(global step {resumption.step}): same run folder and metrics file"
        )
    else:
        say(f"{subcommand}: using {resumption.checkpoint} (global step {resumption.step})")
    return resumption


def say(message: str) -> None:
    """Print ``cppo: message`` on rank zero."""
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
        say(f"continuing {path}: {len(kept)} rows kept, {len(rows) - len(kept)} after the checkpoint dropped")
