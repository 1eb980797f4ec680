"""Grouped scoring (``update.shared_prefix``) against one row per rollout, at the real Qwen2.5-VL-3B widths.

    python benchmarks/grouped_scoring.py                          # 256 visual tokens, 64-token completions
    python benchmarks/grouped_scoring.py --visual-tokens 1024 --new-tokens 256

Builds ``random:qwen2_5_vl-3b`` with ``--text-layers``/``--vision-layers`` (full widths, vocabulary
151,936, random weights, fp32) once, then for GRPO and CPPO, grouped and per row, each in its own child
process: one prompt with one image of exactly ``--visual-tokens`` visual tokens, ``G`` completions of exactly
``--new-tokens`` tokens (handmade, so both modes score the same tokens), advantages of both signs (CPPO's
views for the rows with A > 0), LoRA with gradient checkpointing (the shipped QLoRA-3B settings, without
the 4-bit base), one micro-batch. It times the update's two parts as the module runs them: the no-grad
scoring (the reference pass, ``beta = 0.01``) and the gradient pass (forwards and backwards), the median
of ``--repeats`` after one warm-up, and reports two memory figures per child:

* ``activations``: the bytes of the tensors autograd saves for backward during the gradient pass (each
  storage once; a ``saved_tensors_hooks`` count, exact and cheap): what grouping changes most;
* ``peak RSS``: the child's peak resident set above its resident set after loading the model (coarse: the
  allocator's caching counts too; the CPU has no ``max_memory_allocated``).

Ratios are per-row / grouped (> 1: grouped is faster or smaller), from one run. The profiler-based tensor
memory of ``real_scale.py`` is not used here: on the CPU its overhead dwarfs the grouped forward's time.
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
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
GB = 1e9


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def one_image_batch(folder: str, visual_tokens: int):
    """One prompt whose three views are random images of exactly ``visual_tokens`` visual tokens."""
    import numpy as np

    from cppo_lightning.batch import PromptBatch
    from cppo_lightning.models import load_processor
    from helpers import encoded_prompt

    processor = load_processor(folder)
    rows = max(d for d in range(1, int(visual_tokens**0.5) + 1) if visual_tokens % d == 0)
    shape = (28 * rows, 28 * (visual_tokens // rows), 3)
    rng = np.random.default_rng(0)
    images = {
        view: rng.integers(0, 256, shape, dtype=np.uint8) for view in ("original", "preserving", "removing")
    }
    question = (
        "As shown in the figure, the two lines are parallel and the angle marked in the diagram is 40 "
        "degrees. What is the measure of the angle x? Choices: A. 40 B. 50 C. 130 D. 140"
    )
    example = encoded_prompt(processor, question, images, "random-0")
    return PromptBatch.from_examples([example], processor.tokenizer.pad_token_id)


def run_child(options) -> dict:
    import torch

    from cppo_lightning.models import PolicyConfig
    from cppo_lightning.objectives import CPPO, GRPO
    from cppo_lightning.update import UpdateConfig
    from helpers import handmade_rollout, small_module

    torch.set_num_threads(os.cpu_count() or 1)
    objective = {"grpo": GRPO(beta=0.01), "cppo": CPPO(beta=0.01)}[options.objective]
    module = small_module(
        options.folder,
        objective=objective,
        update=UpdateConfig(micro_batch_rollouts=None, shared_prefix=options.mode == "grouped"),
    )
    module.policy_config = PolicyConfig(options.folder, finetuning="lora", gradient_checkpointing=True)
    module.configure_model()
    module.policy.model.train()
    batch = one_image_batch(options.folder, options.visual_tokens)
    group = options.group
    signs = [1.0 if index % 2 == 0 else -1.0 for index in range(group)]  # about half the rows A > 0
    resident = rss_bytes()
    times, activations = [], 0
    for repeat in range(options.repeats + 1):
        rollout = handmade_rollout(batch, group, [options.new_tokens] * group, advantages=signs)
        updater = module.policy_update()
        started = time.perf_counter()
        scorer = updater.score(batch, rollout)
        scored = time.perf_counter()
        saved: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            saved.setdefault(storage.data_ptr(), storage.nbytes())
            return tensor

        module.policy.model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            updater.accumulate_gradients(scorer, list(range(len(rollout))))
        finished = time.perf_counter()
        if repeat:  # the first one warms up
            times.append((scored - started, finished - scored))
            activations = max(activations, sum(saved.values()))
    return {
        "reference_s": statistics.median(t[0] for t in times),
        "gradient_s": statistics.median(t[1] for t in times),
        "activations": activations,
        "peak_rss": rss_bytes() - resident,
        "prompt_tokens": batch.prompt_lengths()[0],
        "prompt_tokens_saved": 1.0 - scorer.prompt_tokens_computed / scorer.prompt_tokens_per_row,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--visual-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="measured repeats after one warm-up")
    parser.add_argument(
        "--model-folder", help="reuse a built model folder (default: build one, then delete it)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--objective", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(json.dumps(run_child(options)))
        return

    from cppo_lightning.models.tiny import build_random_vlm

    with tempfile.TemporaryDirectory() as temporary:
        folder = options.model_folder or str(Path(temporary) / "model")
        if not (Path(folder) / "config.json").exists():
            build_random_vlm(
                folder, "qwen2_5_vl-3b", options.text_layers, options.vision_layers, dtype="float32"
            )
        results = {}
        for objective in ("grpo", "cppo"):
            for mode in ("grouped", "per-row"):
                arguments = [sys.executable, __file__, "--child", "1", "--folder", folder]
                arguments += ["--objective", objective, "--mode", mode]
                for flag in ("visual_tokens", "new_tokens", "group", "repeats"):
                    arguments += [f"--{flag.replace('_', '-')}", str(getattr(options, flag))]
                child = subprocess.run(arguments, capture_output=True, text=True, check=True)
                results[(objective, mode)] = json.loads(child.stdout.strip().splitlines()[-1])

    first = results[("grpo", "grouped")]
    print(
        f"Qwen2.5-VL-3B widths, random weights, {options.text_layers} text / {options.vision_layers} vision "
        f"layer(s), fp32, LoRA + gradient checkpointing, {os.cpu_count()} CPU cores; 1 prompt of "
        f"{first['prompt_tokens']} tokens ({options.visual_tokens} visual) x G={options.group}, completions of "
        f"{options.new_tokens} tokens, beta 0.01; median of {options.repeats} after a warm-up"
    )
    print(f"{'':30s}{'grouped':>10s}{'per-row':>10s}{'per-row/grouped':>17s}")
    for objective in ("grpo", "cppo"):
        grouped, per_row = results[(objective, "grouped")], results[(objective, "per-row")]
        print(objective.upper())
        rows = [
            ("reference scoring (s)", "reference_s", 1.0),
            ("gradient pass (s)", "gradient_s", 1.0),
            ("saved activations (GB)", "activations", GB),
            ("peak RSS above loaded (GB)", "peak_rss", GB),
        ]
        for label, key, scale in rows:
            a, b = grouped[key] / scale, per_row[key] / scale
            print(f"  {label:28s}{a:10.2f}{b:10.2f}{b / a if a else float('nan'):17.2f}")
        update = (
            grouped["reference_s"] + grouped["gradient_s"],
            per_row["reference_s"] + per_row["gradient_s"],
        )
        print(f"  {'update (s)':28s}{update[0]:10.2f}{update[1]:10.2f}{update[1] / update[0]:17.2f}")
        print(
            f"  {'prompt tokens saved':28s}{grouped['prompt_tokens_saved']:10.2f}{per_row['prompt_tokens_saved']:10.2f}"
        )


if __name__ == "__main__":
    main()
