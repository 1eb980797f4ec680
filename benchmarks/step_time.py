"""CPPO vs GRPO: step time, update-phase time, stacked-view forward speed-up, peak memory.

Everything is measured in one run of this script, on the same machine, and printed as ratios:

    python benchmarks/step_time.py                 # tiny "demo" Qwen2.5-VL, CPU
    python benchmarks/step_time.py --size smoke --steps 6

* Step time: the same data, seeds and rollout settings for GRPO and CPPO (release defaults: G=5,
  lambda=0.01, gating on A > 0); a reward that varies between samples so that about half the rollouts
  have A > 0, as in real training. Median over steps after a warm-up step. Each objective runs in its
  own child process so that peak memory (RSS on CPU, ``max_memory_allocated`` on GPU) is its own.
* Stacked views: one forward+backward over ``[I; I+; I-]`` rows vs three separate forward+backward calls
  on the same rows (what the reference release does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def varied_reward(prompts, completions, answers, **columns):
    """Differs between samples of an untrained model: about half the rollouts get A > 0."""
    return [float(len(completion) % 2) for completion in completions]


def peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class Timings:
    """Collects the module's own per-step timings (rollout, update) after each step."""

    def __init__(self):
        import lightning.pytorch as pl

        outer = self

        class Callback(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                metrics = trainer.callback_metrics
                keys = ("time/rollout_s", "time/update_s", "time/scoring_s")
                outer.rows.append({k: float(metrics[k]) for k in keys})

        self.rows: list[dict[str, float]] = []
        self.callback = Callback()


def run_objective(
    name: str,
    model: str,
    steps: int,
    batch_size: int,
    max_new_tokens: int,
    shared_prefix: bool = True,
    reward: str = "step_time.varied_reward",
    **update,
) -> dict:
    """Train ``steps`` steps (after a warm-up step) with one objective; return the median timings and the
    peak memory (run it in a child process for a peak of its own). ``update``: more UpdateConfig settings."""
    import lightning.pytorch as pl
    import torch

    from cppo_lightning import CPPOModule, PolicyConfig, RolloutConfig, UpdateConfig
    from cppo_lightning.objectives import CPPO, GRPO
    from datamodules import SyntheticVQADataModule

    torch.set_num_threads(os.cpu_count() or 1)
    objective = {"grpo": GRPO(), "cppo": CPPO()}[name]
    module = CPPOModule(
        policy=PolicyConfig(model),
        objective=objective,
        rollout=RolloutConfig(samples_per_prompt=5, max_new_tokens=max_new_tokens),
        update=UpdateConfig(micro_batch_rollouts=batch_size * 5, shared_prefix=shared_prefix, **update),
        reward_functions={reward: 1.0},
    )
    mini = update.get("mini_batch_prompts")
    optimizer_steps = batch_size // mini if mini else 1  # per RL step
    data = SyntheticVQADataModule(
        train_size=batch_size * (steps + 1),
        val_size=0,
        test_size=0,
        batch_size=batch_size,
        processor_name_or_path=model,
        seed=1,
    )
    timings = Timings()
    trainer = pl.Trainer(
        max_steps=optimizer_steps * (steps + 1),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timings.callback],
        accelerator="auto",
        devices=1,
    )
    baseline = None

    class Baseline(pl.Callback):
        def on_train_start(self, trainer, module):
            nonlocal baseline
            baseline = peak_memory_gb(module.device)

    trainer.callbacks.append(Baseline())
    trainer.fit(module, datamodule=data)
    rows = timings.rows[1:]  # the first step warms up
    return {
        "rollout_s": statistics.median(r["time/rollout_s"] for r in rows),
        "update_s": statistics.median(r["time/update_s"] for r in rows),
        "scoring_s": statistics.median(r["time/scoring_s"] for r in rows),
        "old_policy_forwards": module.old_policy_forwards,
        "step_s": statistics.median(r["time/rollout_s"] + r["time/update_s"] for r in rows),
        "peak_gb": peak_memory_gb(module.device),
        "baseline_gb": baseline,
        "device": str(module.device),
    }


def stacked_vs_separate(model: str, rows: int, length: int, repeats: int) -> dict:
    """Forward+backward time of one stacked call over three views vs three separate calls."""
    import numpy as np
    import torch

    from cppo_lightning.batch import concat_vision_inputs
    from cppo_lightning.models import PolicyConfig, chat_prompt, load_policy
    from cppo_lightning.models.scoring import completion_logits
    from cppo_lightning.objectives import token_logprobs

    torch.manual_seed(0)
    policy = load_policy(PolicyConfig(model), reference=False)
    processor = policy.processor
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    views = [image, np.clip(image.astype(int) + 30, 0, 255).astype(np.uint8), np.zeros_like(image)]
    text = chat_prompt(processor, "How many red shapes are in the image?")
    inputs = [
        dict(processor(images=[view] * rows, text=[text] * rows, return_tensors="pt")) for view in views
    ]
    completion = torch.randint(10, 200, (rows, length))
    mask = torch.ones_like(completion, dtype=torch.bool)
    stacked = concat_vision_inputs(inputs)

    def separate():
        for view_inputs in inputs:
            token_logprobs(
                completion_logits(policy.model, view_inputs, completion, mask), completion
            ).sum().backward()

    def together():
        three = completion.repeat(3, 1)
        token_logprobs(
            completion_logits(policy.model, stacked, three, mask.repeat(3, 1)), three
        ).sum().backward()

    results = {}
    for name, function in (("separate", separate), ("stacked", together)):
        function()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
    return results


def padding_comparison(prompts: int = 16, group: int = 5, seed: int = 0) -> dict:
    """Padding of the update's forwards on a batch of mixed lengths: before (consecutive rollouts, the
    batch's prompt width) and after (grouped by length under a token budget, prompts trimmed).

    Lengths drawn as in visual math RL: prompts of 300-1,100 tokens (images of 256-1,024 visual tokens),
    completions log-normal around 300 tokens, capped at 1,024; half the rollouts carry CPPO's two views.
    """
    import numpy as np

    from cppo_lightning.update import MicroBatch, padding_fraction, plan_micro_batches

    rng = np.random.default_rng(seed)
    prompt = np.repeat(rng.integers(300, 1100, prompts), group).tolist()
    completion = np.minimum(rng.lognormal(np.log(300), 0.8, prompts * group), 1024).astype(int).tolist()
    stacked = [3 if rng.random() < 0.5 else 1 for _ in completion]
    rows = list(range(len(completion)))
    widest = max(prompt)
    # Before: 2 rollouts per forward in arrival order, every prompt padded to the batch's longest.
    before = [
        MicroBatch(
            rows[i : i + 2], widest, max(completion[r] for r in rows[i : i + 2]), sum(stacked[i : i + 2])
        )
        for i in range(0, len(rows), 2)
    ]
    after = plan_micro_batches(rows, prompt, completion, stacked, max_tokens=8192)
    return {
        "before": padding_fraction(before, prompt, completion, stacked),
        "after": padding_fraction(after, prompt, completion, stacked),
        "forwards_before": len(before),
        "forwards_after": len(after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="demo", choices=["smoke", "small", "demo"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step (x G=5 rollouts)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--shared-prefix",
        choices=["true", "false", "both"],
        default="true",
        help="update.shared_prefix; both: each objective grouped and per row, in one run",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args()

    from cppo_lightning.models import build_tiny_vlm

    if options.child:
        name, mode, model = options.child.split(":", 2)
        result = run_objective(
            name, model, options.steps, options.batch_size, options.max_new_tokens, mode == "true"
        )
        print(json.dumps(result))
        return
    modes = ("true", "false") if options.shared_prefix == "both" else (options.shared_prefix,)

    with tempfile.TemporaryDirectory() as folder:
        model = str(build_tiny_vlm(Path(folder) / "model", "qwen2_5_vl", options.size))
        results = {}
        for name, mode in [(name, mode) for mode in modes for name in ("grpo", "cppo")]:
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    f"{name}:{mode}:{model}",
                    "--steps",
                    str(options.steps),
                    "--batch-size",
                    str(options.batch_size),
                    "--max-new-tokens",
                    str(options.max_new_tokens),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[(name, mode)] = json.loads(child.stdout.strip().splitlines()[-1])
        views = stacked_vs_separate(
            model, rows=options.batch_size * 5 // 2, length=options.max_new_tokens, repeats=5
        )

    grpo, cppo = results[("grpo", modes[0])], results[("cppo", modes[0])]
    print(
        f"machine: {os.cpu_count()} CPU cores, device {grpo['device']}; tiny Qwen2.5-VL '{options.size}'; "
        f"{options.steps} steps of {options.batch_size} prompts x G=5, {options.max_new_tokens} new tokens"
    )
    for mode in modes:
        grpo, cppo = results[("grpo", mode)], results[("cppo", mode)]
        print(f"update.shared_prefix: {mode}")
        print(f"{'':28s}{'GRPO':>10s}{'CPPO':>10s}{'CPPO/GRPO':>11s}")
        for key, label in (
            ("step_s", "step time (s, median)"),
            ("rollout_s", "  rollout (s)"),
            ("update_s", "  update (s)"),
        ):
            print(f"{label:28s}{grpo[key]:10.3f}{cppo[key]:10.3f}{cppo[key] / grpo[key]:11.2f}")
    if len(modes) == 2:
        print(f"{'per-row / grouped':28s}{'GRPO':>10s}{'CPPO':>10s}")
        for key, label in (("step_s", "step time"), ("update_s", "  update")):
            values = [results[(n, "false")][key] / results[(n, "true")][key] for n in ("grpo", "cppo")]
            print(f"{label:28s}{values[0]:10.2f}{values[1]:10.2f}")
    grpo, cppo = results[("grpo", modes[0])], results[("cppo", modes[0])]
    grpo_extra, cppo_extra = grpo["peak_gb"] - grpo["baseline_gb"], cppo["peak_gb"] - cppo["baseline_gb"]
    print(
        f"{'peak memory (GB)':28s}{grpo['peak_gb']:10.3f}{cppo['peak_gb']:10.3f}{cppo['peak_gb'] / grpo['peak_gb']:11.2f}"
    )
    print(
        f"{'  of it during training':28s}{grpo_extra:10.3f}{cppo_extra:10.3f}{cppo_extra / max(grpo_extra, 1e-9):11.2f}"
    )
    print(
        f"stacked-view forward+backward: {views['stacked']:.3f} s vs three separate calls {views['separate']:.3f} s "
        f"-> speed-up {views['separate'] / views['stacked']:.2f}x"
    )
    padding = padding_comparison()
    print(
        f"padding on a mixed-length batch (16 prompts x G=5): {padding['before']:.1%} of the forwards' tokens "
        f"before (2 rollouts per forward, batch-wide prompt width; {padding['forwards_before']} forwards) vs "
        f"{padding['after']:.1%} after (grouped by length, 8,192-token budget; {padding['forwards_after']} forwards)"
    )


if __name__ == "__main__":
    main()
