"""Kill -9 a short `cppo fit` at random moments, resume it, and compare with an uninterrupted run.

    .venv/bin/python benchmarks/fault_injection.py --trials 5

A short CPPO run of the demo config (tiny `demo` Qwen2.5-VL, LoRA, a few steps, a checkpoint every
`--every` steps, validation in between) is first run without interruption. Then, for each trial, the same
run is started in its own folder and killed with SIGKILL at a random moment: a random fraction into a
random step (step 0 includes start-up), timed by the run's own progress and the reference's step times, so
that it lands anywhere (start-up, rollout, update, validation or a checkpoint write alike); then resumed with
`cppo fit ... --ckpt_path last` to the end. After each kill the script checks that no file under a
checkpoint's name is incomplete; after each resume, that the final trainable parameters (the LoRA
adapters in `last.ckpt`) equal the uninterrupted run's bit for bit and that `metrics.csv` holds the same
rows (wall-clock columns aside). CPU runs are deterministic for a seed, so the tolerance is zero.

Not a test: it takes minutes (about 2 x trials + 1 runs of the CLI).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def varied_reward(prompts, completions, answers, **columns):
    """A reward that differs between samples of a random tiny model, so every step changes the adapters."""
    return [float(len(completion) % 3) for completion in completions]


def fit_args(save_dir: Path, steps: int, every: int, model: str) -> list[str]:
    callbacks = [
        {
            "class_path": "callbacks.AtomicCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": every},
        },
        {"class_path": "callbacks.AdapterExport"},
        {"class_path": "callbacks.PreemptionCheckpoint"},
    ]
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "demo" / "cppo.yaml"),
        "--model.policy.model_name_or_path",
        model,
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.callbacks",
        json.dumps(callbacks),
        "--data.init_args.train_size",
        "32",
        "--data.init_args.val_size",
        "4",
        "--data.init_args.test_size",
        "0",
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.eval_batch_size",
        "4",
        "--model.rollout.samples_per_prompt",
        "4",
        "--model.rollout.max_new_tokens",
        "12",
        "--model.update.micro_batch_size",
        "8",
        "--model.evaluation.samples_per_question",
        "2",
        "--model.reward_functions",
        json.dumps({"fault_injection.varied_reward": 1.0}),
    ]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        NO_ALBUMENTATIONS_UPDATE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # The reward function above is imported by the training process from this folder.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def cppo() -> str:
    return str(Path(sys.executable).with_name("cppo"))


def train_rows(metrics_root: Path) -> int:
    """Training steps logged so far by the newest run under ``metrics_root`` (rows are flushed every step)."""
    files = sorted(metrics_root.glob("version_*/metrics.csv"))
    if not files:
        return 0
    with open(files[-1]) as handle:
        return sum(1 for row in csv.DictReader(handle) if row.get("train/loss"))


def watch(args: list[str], run_root: Path, log: Path, kill_at=None) -> tuple[int, list[float]]:
    """Run ``cppo`` and follow its progress; ``kill_at(times)`` returning True kills it with SIGKILL.

    Returns:
        ``(status, times)``: the exit status (-9 when killed) and, for each k, the seconds from the start
        until k training steps were logged (``times[0] == 0``).
    """
    with open(log, "a") as handle:
        process = subprocess.Popen(
            [cppo(), *args], env=environment(), stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
        )
        started, times = time.monotonic(), [0.0]
        while process.poll() is None:
            now = time.monotonic() - started
            times += [now] * max(0, train_rows(run_root) + 1 - len(times))
            if kill_at is not None and kill_at(times, now):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return -9, times
            time.sleep(0.05)
    return process.returncode, times


def newest_run(save_dir: Path) -> Path:
    runs = sorted((save_dir / "cppo").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return runs[-1] if runs else save_dir / "cppo" / "version_0"


def trained_state(run: Path):
    import torch

    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def metric_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return [
            {key: value for key, value in row.items() if not key.startswith(("time/", "throughput/"))}
            for row in csv.DictReader(handle)
        ]


def compare(run: Path, reference: Path) -> tuple[bool, float, bool]:
    """(bitwise equal, max |difference|, metrics rows equal) of a resumed run against the reference."""
    final, expected = trained_state(run), trained_state(reference)
    if final.keys() != expected.keys():
        return False, float("inf"), False
    largest = max(float((final[key].float() - expected[key].float()).abs().max()) for key in final)
    equal = all(final[key].equal(expected[key]) for key in final)
    return equal, largest, metric_rows(run) == metric_rows(reference)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2, help="checkpoint every this many steps")
    parser.add_argument("--model", default="tiny:qwen2_5_vl-demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--output", default=None, help="folder for the runs (default: a temporary one)")
    options = parser.parse_args(argv)
    from callbacks.checkpointing import checkpoint_problem

    output = Path(options.output or tempfile.mkdtemp(prefix="cppo-faults-"))
    output.mkdir(parents=True, exist_ok=True)
    rng = random.Random(options.seed)
    reference_dir = output / "reference"
    status, reference_times = watch(
        fit_args(reference_dir, options.steps, options.every, options.model),
        reference_dir / "cppo",
        output / "reference.log",
    )
    if status != 0:
        sys.exit(f"the uninterrupted run failed (status {status}); see {output / 'reference.log'}")
    reference = reference_dir / "cppo" / "version_0"
    durations = [b - a for a, b in zip(reference_times, reference_times[1:])]  # [0]: start-up + first step
    print(
        f"uninterrupted run: {options.steps} steps in {reference_times[-1]:.0f} s ({reference})", flush=True
    )
    print(
        "trial  kill (step+)  steps logged  complete checkpoints  resumed from       bitwise  max|diff|  metrics"
    )
    results = []
    trial = 0
    while len(results) < options.trials:
        trial += 1
        save_dir = output / f"trial{trial}"
        log = output / f"trial{trial}.log"
        args = fit_args(save_dir, options.steps, options.every, options.model)
        # A random fraction of a random step (step 0 includes start-up), timed like the reference's step.
        step, fraction = rng.randrange(options.steps), rng.random()

        def kill_at(times, now, step=step, fraction=fraction):
            return len(times) > step and now >= times[step] + fraction * durations[step]

        status, _ = watch([*args, "--ckpt_path", "last"], save_dir / "cppo", log, kill_at)
        if status != -9:
            print(f"{trial:5d}  {f'{step}+{fraction:.2f}':>12s}  (finished before the kill: drawn again)")
            continue
        run = newest_run(save_dir)
        checkpoints = sorted((run / "checkpoints").glob("*.ckpt")) if run.exists() else []
        broken = [path.name for path in checkpoints if checkpoint_problem(path) is not None]
        logged = (
            len([r for r in metric_rows(run) if r.get("train/loss")]) if (run / "metrics.csv").exists() else 0
        )
        logged_text = f"{logged}" if checkpoints else f"{logged} (none saved)"
        before = time.perf_counter()
        status, _ = watch([*args, "--ckpt_path", "last"], save_dir / "cppo", log)
        if status != 0:
            sys.exit(f"the resumed run failed (status {status}); see {log}")
        resumed_line = next(
            (line for line in log.read_text().splitlines() if line.startswith("cppo: resuming")),
            "cppo: (new run)",
        )
        # Killed before its first checkpoint, the run starts again (in a new version folder).
        run = newest_run(save_dir)
        equal, largest, same_metrics = compare(run, reference)
        results.append(equal and same_metrics and not broken)
        source = (
            resumed_line.split(" from ")[-1].split(" (")[0] if "resuming" in resumed_line else "fresh start"
        )
        print(
            f"{trial:5d}  {f'{step}+{fraction:.2f}':>12s}  {logged_text:>12s}  {len(checkpoints) - len(broken)} of {len(checkpoints):<15d}"
            f"  {source:<17s}  {str(equal):7s}  {largest:9.2e}  {'same' if same_metrics else 'DIFFERENT'}"
            f"   (resume {time.perf_counter() - before:.0f} s)",
            flush=True,
        )
    print(
        f"\n{sum(results)} of {len(results)} killed-and-resumed runs ended with trainable parameters bitwise equal "
        f"to the uninterrupted run's, the same metrics rows and no incomplete checkpoint file ({output})"
    )
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
