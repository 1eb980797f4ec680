"""Rollout time of the HF engine vs the colocated vLLM engine for the same prompts, in one run.

Each engine samples the same 8 prompts x G=5 with up to 128 new tokens (temperature 1), after one
untimed warm-up rollout; the median of ``--repeats`` timed rollouts is compared, and tokens/s too (the
engines draw different samples, so their completion lengths differ a little). vLLM's start-up is
reported apart. Run it in the vLLM venv (``make vllm-setup``):

    .venv-vllm/bin/python benchmarks/rollout_engines.py                 # tiny 'demo' model, LoRA
    .venv-vllm/bin/python benchmarks/rollout_engines.py --finetuning full --modes in-process engine-process
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage report over the network

import torch  # noqa: E402


def rollouts(engine, policy, batch, rows, config, repeats):
    """Seconds and generated tokens of ``repeats`` rollouts after one warm-up."""
    engine.generate(policy, batch, rows, config, seed=0)
    times, tokens = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        generation = engine.generate(policy, batch, rows, config, seed=repeat + 1)
        times.append(time.perf_counter() - started)
        tokens.append(int(generation.completion_mask.sum()))
    return statistics.median(times), statistics.median(tokens)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:qwen2_5_vl-demo", help="policy checkpoint (head_dim >= 32)")
    parser.add_argument("--finetuning", default="lora", choices=["lora", "full"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=5, help="G, samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["in-process"],
        choices=["in-process", "engine-process"],
        help="vLLM in the training process (the default engine) and/or its engine core in a child process",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    from cppo_lightning.engines import HFEngine, VLLMConfig, VLLMEngine
    from cppo_lightning.models import PolicyConfig, load_policy
    from cppo_lightning.rollout import repeat_rows
    from cppo_lightning.sampling import RolloutConfig
    from datamodules import SyntheticTaskConfig, SyntheticVQADataModule

    policy = load_policy(PolicyConfig(args.model, finetuning=args.finetuning), reference=False)
    data = SyntheticVQADataModule(
        task=SyntheticTaskConfig(image_size=112),
        train_size=args.prompts,
        val_size=0,
        test_size=0,
        batch_size=args.prompts,
        processor_name_or_path=args.model,
        views=("original",),
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    config = RolloutConfig(samples_per_prompt=args.group, temperature=1.0, max_new_tokens=args.max_new_tokens)
    rows = repeat_rows(batch, args.group, torch.device("cpu"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        policy.to(device)
        batch = batch.to(device)
        rows = rows.to(device)
    threads = torch.get_num_threads()

    results = {"hf": rollouts(HFEngine(), policy, batch, rows, config, args.repeats)}
    print("HF generate", results["hf"], flush=True)
    startups = {}
    for mode in args.modes:
        options = VLLMConfig(
            kv_cache_memory_gb=1.0, max_model_len=1024, multiprocessing=mode == "engine-process"
        )
        engine = VLLMEngine(policy, options, config)
        results[mode] = rollouts(engine, policy, batch, rows, config, args.repeats)
        startups[mode] = engine.timings["startup_s"]
        print(mode, results[mode], flush=True)
        engine.close()

    print(
        f"machine: {os.cpu_count()} CPU cores, torch threads {threads}, device {device}; {args.model} "
        f"({args.finetuning}); {args.prompts} prompts x G={args.group}, up to {args.max_new_tokens} new tokens, "
        f"median of {args.repeats}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    hf_time, hf_tokens = results["hf"]
    print(
        f"{'engine':<22}{'rollout s':>10}{'tokens':>8}{'tokens/s':>10}{'HF/engine time':>16}{'start-up s':>12}"
    )
    for name, (seconds, tokens) in results.items():
        label = "HF generate" if name == "hf" else f"vLLM ({name})"
        startup = f"{startups[name]:>12.1f}" if name in startups else f"{'-':>12}"
        print(
            f"{label:<22}{seconds:>10.2f}{tokens:>8}{tokens / seconds:>10.0f}{hf_time / seconds:>16.2f}{startup}"
        )


if __name__ == "__main__":
    main()
