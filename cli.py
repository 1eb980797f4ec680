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
config is saved in the run folder, so every run can be reproduced from its own folder. This file only
parses each command's arguments: what the commands run is in ``recipes/`` (and is importable from here,
as before: ``from cli import lightning_cli, evaluate, audit, predict, warm_start``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

# Before transformers/albumentations are imported.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cppo_lightning.audit import VerdictRule  # noqa: E402
from datamodules.benchmarks import load_benchmark_configs, select_benchmarks  # noqa: E402
from recipes.audit import audit  # noqa: E402
from recipes.demo import demo, study, warm_start  # noqa: E402
from recipes.evaluate import EVAL_CONFIGS, evaluate, predict  # noqa: E402
from recipes.lightning_cli import CPPOLightningCLI, lightning_cli, warmstart_cli  # noqa: E402, F401
from recipes.resume import Resumption, continue_metrics, resolve_checkpoint, resume_arguments  # noqa: E402, F401


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


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo demo",
        description="The CPU demo: warm-start a tiny VLM on the synthetic task, train it with CPPO, "
        "report held-out avg@k before and after.",
    )
    add = parser.add_argument
    add("--config", default="configs/demo/cppo.yaml", help="RL config")
    add("--warmstart-config", default="configs/demo/warmstart.yaml")
    add("--output", default="runs/demo", help="where runs, the warm start and the summary go")
    add("--warmstart-args", default="", help="extra warm-start arguments, e.g. '--trainer.max_steps 20'")
    add("--fit-args", default="", help="extra RL arguments, e.g. '--trainer.max_steps 5'")
    summary = demo(**vars(parser.parse_args(argv)))
    before, after = summary["warm_start_avg_at_k"], summary["trained_avg_at_k"]
    print(f"held-out avg@k: warm start {before:.3f} -> after RL {after:.3f}  ({summary['seconds']:.0f} s)")
    contents = "config.yaml, metrics.csv, checkpoints/, checkpoints/adapter, curves.png, perception/"
    print(f"run folder: {summary['run']}  ({contents})")
    return 0


def _study(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo study",
        description="GRPO vs CPPO vs PAPO from the same warm start: equal steps and rollouts, several seeds, "
        "held-out avg@k as a table (mean, std) and an overlaid plot.",
    )
    add = parser.add_argument
    add("--objectives", default="grpo,papo,cppo,cppo_audited")
    add("--seeds", default="0,1,2")
    add("--warmstart-config", default="configs/demo/warmstart.yaml")
    add("--output", default="runs/study")
    add("--warmstart-args", default="")
    add("--fit-args", default="")
    add("--tag", default="", help="suffix of run names, table labels and result files")
    add("--group-by", default="family", help="test data column to report avg@k per value of ('' = none)")
    add(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each in its own process (CPU: cores / jobs threads each)",
    )
    settings = vars(parser.parse_args(argv))
    settings["group_by"] = settings["group_by"] or None
    objectives, seeds = settings.pop("objectives").split(","), settings.pop("seeds").split(",")
    table, plot = study(objectives=objectives, seeds=seeds, **settings)
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
    add = parser.add_argument
    add(
        "source",
        help="an adapter folder (checkpoints/adapter), a checkpoint (checkpoints/last.ckpt, a file or a sharded FSDP2 folder, any "
        "fine-tuning mode) or a run folder (its checkpoints/last.ckpt)",
    )
    add("output", help="folder for the exported model (new or empty)")
    add("--dtype", default="float32", help="dtype of the written weights (float32, bfloat16, float16)")
    add("--overwrite", action="store_true", help="write into a folder that already holds files")
    add(
        "--adapter",
        action="store_true",
        help="from a LoRA checkpoint: write the PEFT adapter folder instead of the merged model",
    )
    options = parser.parse_args(argv)
    from cppo_lightning.export import ExportError, export

    try:
        print(export(**vars(options)))
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
    from cppo_lightning.plots import main as plot_main

    return plot_main(argv)


def _evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo evaluate",
        description="The paper's evaluation: avg@k (k = 8, temperature 1.0) on its seven benchmarks, graded "
        "rule-based; a report (markdown + JSON) with avg@k +- std over the k samples, one row per model. "
        "Other arguments go to LightningCLI (e.g. --trainer.devices 8).",
    )
    add = parser.add_argument
    add(
        "--model",
        action="append",
        required=True,
        help="hub id or folder; LABEL=PATH names its row; repeat to compare models",
    )
    add("--benchmarks", default="all", help="'all' or names, e.g. mathvista,wemath")
    add("--samples", type=int, help="k samples per question (protocol: 8)")
    add("--max-new-tokens", type=int, help="completion limit (protocol: 4096)")
    add("--max-samples", type=int, help="only the first N questions of each")
    add("--grader", default="mathruler", choices=["mathruler", "math-verify"])
    add("--output", default="runs/eval", help="report folder")
    add("--config-dir", default=str(EVAL_CONFIGS), help="protocol.yaml and benchmark configs")
    add("--ckpt-path", help="a Lightning checkpoint to test (one model)")
    options, extra = parser.parse_known_args(argv)
    settings = vars(options)
    models = {}
    for spec in settings.pop("model"):
        label, separator, path = spec.partition("=")
        models[label if separator else spec] = path if separator else spec
    try:
        select_benchmarks(load_benchmark_configs(options.config_dir), options.benchmarks)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    results = evaluate(models, **settings, extra_args=extra)
    report = Path(options.output) / "report.md"
    if report.exists():
        print(report.read_text())
        print(f"report: {report} and {report.with_suffix('.json')}")
    return 0 if results else 1


def _audit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo audit",
        description="Audit the perturbation pools of a training config before training: does I+ preserve and "
        "I- remove what the task needs? Per transform (and the flat-grey floor): accuracy (sampled avg@k) with "
        "the image, the view and grey, k3 and exact KL to the original, entropy shifts, a verdict; the CPL "
        "direction of the pools as configured; proposed pools. Writes audit.md, audit.json and audit.html. "
        "Other arguments go to LightningCLI (e.g. --model.policy.model_name_or_path runs/demo/warmstart/model).",
    )
    add = parser.add_argument
    add("--config", action="append", required=True, help="training config (as for fit)")
    add("--output", help="report folder (default runs/audit/<config name>)")
    add("--examples", type=int, default=256, help="questions audited")
    add("--samples", type=int, help="completions per question and view (default G)")
    add("--batch-size", type=int, help="prompts per batch (default: the data's)")
    add("--split", default="train", choices=["train", "val", "test"])
    add("--candidates", help="YAML with candidate 'preserving'/'removing' transforms")
    add("--group-by", default="family", help="metadata column grouping the questions ('' for none)")
    add("--device", help="cpu, cuda, ... (default: CUDA when available)")
    add(
        "--divergence-only",
        action="store_true",
        help="sample under I only (no accuracy under the views; verdicts from the divergences): for large models",
    )
    add(
        "--max-generate-rows",
        type=int,
        help="rows per generate call (the views of a batch are stacked into one; lower it on a GPU)",
    )
    defaults = VerdictRule()
    for name, help in (  # VerdictRule's fields, in order
        ("preserving_max", "an I+ transform is preserving up to this position (0 = identity, 1 = grey)"),
        ("removing_min", "an I- transform is removing from this position on"),
        ("min_accuracy_gap", "accuracy counts when acc(I) - acc(grey) is at least this"),
        ("min_floor_divergence", "KL counts when KL(grey) per token is at least this"),
    ):
        add("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name), help=help)
    options, extra = parser.parse_known_args(argv)
    settings = vars(options)
    args = [item for config in settings.pop("config") for item in ("--config", config)] + extra
    rule = VerdictRule(*(settings.pop(field.name) for field in dataclasses.fields(VerdictRule)))
    settings["group_by"] = settings["group_by"] or None
    view_accuracy = not settings.pop("divergence_only")
    result, paths = audit(args, settings.pop("output"), rule=rule, view_accuracy=view_accuracy, **settings)
    print(paths["markdown"].read_text())
    settings = result.settings
    print(
        f"audit of {settings['questions']} questions in {settings['seconds']:.0f} s "
        f"({settings['cpu_seconds']:.0f} s of CPU time; sampling {settings['seconds_sampling']:.0f} s, "
        f"scoring {settings['seconds_scoring']:.0f} s)"
    )
    print("report: " + ", ".join(str(path) for path in paths.values()))
    return 0


def _predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cppo predict",
        description="Sample answers for the test data of a config (k per question, the evaluation settings) "
        "and write them as JSON lines (OUTPUT/samples.jsonl: id, question, answer, completions, extracted "
        "answers, grades). Other arguments go to LightningCLI (--config RUN/config.yaml, --data.init_args.test ...).",
    )
    parser.add_argument("--output", required=True, help="folder for samples.jsonl (and report.md/.json)")
    parser.add_argument("--ckpt_path", "--ckpt-path", help="a checkpoint of the run to sample from")
    options, extra = parser.parse_known_args(argv)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in extra):
        parser.error("give the config of the model and data: --config RUN/config.yaml (or a training config)")
    path = predict(extra, options.output, options.ckpt_path)
    print(f"{path}: {len(path.read_text().splitlines())} questions")
    return 0


#: What ``cppo --help`` lists: LightningCLI's commands, then the project's (name -> (function, help)).
_LIGHTNING_HELP = {
    "fit": "train (LightningCLI; --ckpt_path last / --resume RUN_DIR continue a run)",
    "validate": "avg@k on the validation data (LightningCLI)",
    "test": "avg@k on the test data (LightningCLI)",
}
_COMMANDS = {
    "predict": (_predict, "sample answers for the test data, written as JSON lines"),
    "demo": (_demo, "the CPU demo: warm start, CPPO, held-out accuracy before and after"),
    "study": (_study, "GRPO vs CPPO vs PAPO from one warm start, several seeds, one table"),
    "warmstart": (_warmstart, "supervised warm start; writes a model folder"),
    "evaluate": (_evaluate, "the paper's evaluation on its seven benchmarks (avg@k, a report)"),
    "audit": (_audit, "do the I+ / I- perturbation pools preserve / remove what the task needs?"),
    "export": (_export, "a trained policy as a plain transformers folder (LoRA merged, or full)"),
    "plot": (_plot, "overlay the curves of several runs"),
    "tiny": (_tiny, "build a tiny offline VLM folder"),
}


def _print_help() -> None:
    commands = {**_LIGHTNING_HELP, **{name: text for name, (_, text) in _COMMANDS.items()}}
    width = max(len(name) for name in commands)
    print("usage: cppo COMMAND [options]   (cppo COMMAND --help: the options of one command)\n\ncommands:")
    print("\n".join(f"  {name:<{width}}  {text}" for name, text in commands.items()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cppo`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return 0 if argv else 2
    if argv[0] in _COMMANDS:
        return _COMMANDS[argv[0]][0](argv[1:])
    lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
