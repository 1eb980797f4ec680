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


def run(source: str, model: str, steps: int, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """Median per-step timings of CPPO with ``update.old_logprobs: source``, two optimizer steps per RL step."""
    from step_time import run_objective

    result = run_objective(
        "cppo",
        model,
        steps,
        batch_size,
        max_new_tokens,
        mini_batch_prompts=batch_size // 2,
        old_logprobs=source,
    )
    assert result["old_policy_forwards"] == (0 if source == "sampler" else steps + 1)
    return result


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
    keys = ("step_s", "rollout_s", "update_s", "scoring_s")
    merged = {
        source: {key: statistics.median(run[key] for run in runs) for key in keys}
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
        ("rollout_s", "  rollout (s)"),
        ("update_s", "  update (s)"),
        ("scoring_s", "    old-policy scoring (s)"),
    ):
        policy, sampler = merged["policy"][key], merged["sampler"][key]
        ratio = f"{sampler / policy:16.2f}" if policy > 0 else f"{'':16s}"
        print(f"{label:28s}{policy:10.3f}{sampler:10.3f}{ratio}")
    policy = merged["policy"]
    print(
        f"old-policy scoring is {policy['scoring_s'] / policy['step_s']:.1%} of a step with old_logprobs: policy"
    )


if __name__ == "__main__":
    main()
