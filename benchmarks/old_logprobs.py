"""What ``update.old_logprobs: sampler`` saves: the old-policy forward, against its cost in the rollout.

Everything is measured in one run of this script, on the same machine, and printed as ratios:

    python benchmarks/old_logprobs.py                # tiny "demo" Qwen2.5-VL, CPU, HF engine
    python benchmarks/old_logprobs.py --steps 6 --repeats 1

With two optimizer steps per rollout batch (``mini_batch_prompts`` = half the batch) the update needs
``lp_old``. ``old_logprobs: policy`` scores every rollout with the policy in a no-grad forward
(``time/scoring_s``); ``old_logprobs: sampler`` takes the engine's log-probs, which the HF engine records
while it samples (one log-softmax per decoding step, in ``time/rollout_s``). The two settings alternate
``--repeats`` times in one process on the same data and seeds (the same rollouts); each figure is the
median over the steps after a warm-up step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

KEYS = ("time/rollout_s", "time/scoring_s", "time/update_s")


def varied_reward(prompts, completions, answers, **columns):
    """Differs between samples of an untrained model, so that advantages are not all 0."""
    return [float(len(completion) % 2) for completion in completions]


def run(source: str, model: str, steps: int, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """Median per-step timings of ``steps`` steps (after a warm-up) with ``update.old_logprobs: source``."""
    import lightning.pytorch as pl

    from cppo_lightning import CPPOModule, PolicyConfig, RolloutConfig, UpdateConfig
    from cppo_lightning.objectives import CPPO
    from datamodules import SyntheticVQADataModule

    rows: list[dict[str, float]] = []

    class Timings(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            rows.append({key: float(trainer.callback_metrics[key]) for key in KEYS})

    module = CPPOModule(
        policy=PolicyConfig(model),
        objective=CPPO(),
        rollout=RolloutConfig(samples_per_prompt=5, max_new_tokens=max_new_tokens),
        update=UpdateConfig(
            mini_batch_prompts=batch_size // 2, micro_batch_rollouts=batch_size * 5, old_logprobs=source
        ),
        reward_functions={"old_logprobs.varied_reward": 1.0},
    )
    data = SyntheticVQADataModule(
        train_size=batch_size * (steps + 1),
        val_size=0,
        test_size=0,
        batch_size=batch_size,
        processor_name_or_path=model,
        seed=1,
    )
    trainer = pl.Trainer(
        max_steps=2 * (steps + 1),  # two optimizer steps per RL step
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timings()],
        accelerator="auto",
        devices=1,
    )
    trainer.fit(module, datamodule=data)
    assert module.old_policy_forwards == (0 if source == "sampler" else steps + 1)
    timings = {key: statistics.median(row[key] for row in rows[1:]) for key in KEYS}
    timings["step_s"] = statistics.median(row["time/rollout_s"] + row["time/update_s"] for row in rows[1:])
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="demo", choices=["smoke", "small", "demo"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step (x G=5 rollouts)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each setting")
    options = parser.parse_args()

    import torch

    from cppo_lightning.models import build_tiny_vlm

    torch.set_num_threads(os.cpu_count() or 1)
    results: dict[str, list[dict[str, float]]] = {"policy": [], "sampler": []}
    with tempfile.TemporaryDirectory() as folder:
        model = str(build_tiny_vlm(Path(folder) / "model", "qwen2_5_vl", options.size))
        for _ in range(options.repeats):
            for source in results:
                results[source].append(
                    run(source, model, options.steps, options.batch_size, options.max_new_tokens)
                )
    merged = {
        source: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for source, runs in results.items()
    }
    print(
        f"machine: {os.cpu_count()} CPU cores; tiny Qwen2.5-VL '{options.size}', CPPO, HF engine; "
        f"{options.steps} steps of {options.batch_size} prompts x G=5, {options.max_new_tokens} new tokens, "
        f"2 optimizer steps per rollout batch; {options.repeats} alternating runs per setting"
    )
    print(f"{'old_logprobs:':28s}{'policy':>10s}{'sampler':>10s}{'sampler/policy':>16s}")
    for key, label in (
        ("step_s", "step time (s, median)"),
        ("time/rollout_s", "  rollout (s)"),
        ("time/update_s", "  update (s)"),
        ("time/scoring_s", "    old-policy scoring (s)"),
    ):
        policy, sampler = merged["policy"][key], merged["sampler"][key]
        ratio = f"{sampler / policy:16.2f}" if policy > 0 else f"{'':16s}"
        print(f"{label:28s}{policy:10.3f}{sampler:10.3f}{ratio}")
    policy = merged["policy"]
    print(
        f"old-policy scoring is {policy['time/scoring_s'] / policy['step_s']:.1%} of a step with old_logprobs: policy"
    )


if __name__ == "__main__":
    main()
