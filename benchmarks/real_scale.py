"""Real-scale evidence without a hub: a released VLM architecture with random weights, realistic lengths,
time and memory per phase of the RL step, GRPO against CPPO, all measured in one run.

    # Qwen2.5-VL-3B at full depth with the shipped QLoRA configs (16 prompts x G=5, 1,024-token
    # completions, 512 visual tokens per image): a GPU job, see benchmarks/gpu_check.sh
    python benchmarks/real_scale.py
    # full width, depth cut, small sizes (what the 2-core CPU affords); JSON for --fit
    python benchmarks/real_scale.py --text-layers 2 --vision-layers 2 --prompts 1 --new-tokens 32 \\
        --visual-tokens 256 --json runs/real_scale/t2v2.json
    # extrapolate the memory of those runs to the released depth
    python benchmarks/real_scale.py --fit runs/real_scale/t2v2.json runs/real_scale/t4v4.json

What it does:

* builds ``--model`` (default ``random:qwen2_5_vl-3b``, the released 3B shapes: hidden 2048, 36 layers,
  vocabulary 151,936, the 32-block vision tower) with random weights in bf16 into a temporary folder
  (on the GPU if there is one), deleted at the end;
* trains each config (``--config``, default the shipped QLoRA-3B CPPO config, and ``--baseline``, its
  GRPO twin) for ``--warmup`` + ``--steps`` RL steps in its own child process, with the config's
  policy, objective, rollout, update, optimizer, precision and data settings; only the model, the
  data (random-noise images of exactly ``--visual-tokens`` visual tokens, the config's prompt
  template), the sizes given on the command line, and the reward change;
* forces the lengths: every completion has exactly ``--new-tokens`` tokens (``min_new_tokens`` =
  ``max_new_tokens``); the reward alternates 1, 0, 1, ... over the rollouts, so that about half have
  A > 0 as in real training (CPPO's extra views are computed for those rows only);
* prints per phase (``rollout``: generation and rewards; ``reference``: the update's no-grad
  scoring; ``gradient``: forwards, backwards, optimizer steps) the time, tokens/s and peak memory, and
  the CPPO/GRPO ratios.

Memory is tensor memory, never RSS: on CUDA ``max_memory_allocated`` (and the allocator's reservation);
on the CPU the profiler's allocation events during the phase (``memory.TensorMemory``) on top of the
tensors alive when it starts (weights, quantization states, LoRA, gradients, optimizer state, counted).
On the CPU the profiler is on during the measured steps, so their times include its overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

PHASES = ("rollout", "scoring", "reference", "gradient")
PHASE_LABELS = {
    "rollout": "generation",
    "scoring": "old-policy scoring",
    "reference": "reference scoring",
    "gradient": "gradient pass",
}
#: The phases the depth fit and the config estimate cover (old-policy scoring costs what reference scoring
#: does, and runs only with several optimizer steps per rollout batch or a vLLM sampler).
FIT_PHASES = ("rollout", "reference", "gradient")
#: The update's phases (everything after generation and rewards).
UPDATE_PHASES = ("scoring", "reference", "gradient")
GB = 1e9
DEFAULT_CONFIG = ROOT / "configs" / "qwen2_5_vl_3b" / "qlora_cppo.yaml"
PIXELS_PER_VISUAL_TOKEN = 28 * 28  # Qwen2.5-VL: 14 px patches merged 2 x 2


def alternating_reward(prompts, completions, answers, **columns):
    """1, 0, 1, 0, ... over the rollouts (G consecutive rows per prompt): about half get A > 0.

    A random model's completions carry no signal to grade; this gives every group two rewards, so
    the advantages and CPPO's ``A > 0`` rows are those of a typical training step.
    """
    return [float(index % 2 == 0) for index in range(len(completions))]


# ---------------------------------------------------------------------------------------------- memory


def storage_bytes(tensors: Iterable) -> int:
    """Bytes of the storages behind ``tensors`` (None and non-tensors skipped), each storage counted once."""
    import torch

    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def module_tensors(module) -> Iterator:
    """A module's parameters (4-bit ones with bitsandbytes' quantization state), gradients and buffers."""

    def quant_state(state, depth=0):  # absmax, code, offset; a nested state under double quantization
        for value in vars(state).values():
            if type(value).__name__ == "QuantState" and depth < 2:
                yield from quant_state(value, depth + 1)
            else:
                yield value

    for parameter in module.parameters():
        yield parameter
        yield parameter.grad
        if getattr(parameter, "quant_state", None) is not None:
            yield from quant_state(parameter.quant_state)
    yield from module.buffers()


def resident_tensor_bytes(module, optimizers=()) -> int:
    """Bytes of the tensors a training step keeps alive: :func:`module_tensors` and the optimizers' state."""
    states = (
        value for optimizer in optimizers for state in optimizer.state.values() for value in state.values()
    )
    return storage_bytes(itertools.chain(module_tensors(module), states))


def layer_resident_bytes(model, suffix: str, optimizer=None) -> int:
    """Resident bytes of the first submodule whose name ends with ``suffix`` (e.g. ``layers.0``), with its
    parameters' optimizer state: what each added layer costs."""
    for name, submodule in model.named_modules():
        if name.endswith(suffix):
            state = optimizer.state if optimizer is not None else {}
            owned = (value for p in submodule.parameters() if p in state for value in state[p].values())
            return storage_bytes(itertools.chain(module_tensors(submodule), owned))
    raise KeyError(f"no submodule named like {suffix!r}")


# ---------------------------------------------------------------------------------------------- the run


def _import(path: str):
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def load_config(path: str | Path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def module_arguments(config: dict, model_folder: str, options) -> dict:
    """CPPOModule arguments from a LightningCLI config's ``model`` section, with this run's sizes."""
    model = json.loads(json.dumps(config["model"]))  # a deep copy of plain data
    policy = model["policy"]
    policy["model_name_or_path"] = model_folder
    if options.finetuning:
        policy["finetuning"] = options.finetuning
    rollout = model.setdefault("rollout", {})
    if options.group:
        rollout["samples_per_prompt"] = options.group
    new_tokens = options.new_tokens or rollout.get("max_new_tokens", 1024)
    rollout["max_new_tokens"] = rollout["min_new_tokens"] = new_tokens
    optimizer = model.pop("optimizer", None)
    if isinstance(optimizer, dict):
        model["optimizer"] = functools.partial(
            _import(optimizer["class_path"]), **optimizer.get("init_args", {})
        )
    scheduler = model.pop("scheduler", None)
    if isinstance(scheduler, dict):
        model["scheduler"] = functools.partial(
            _import(scheduler["class_path"]), **scheduler.get("init_args", {})
        )
    model["reward_functions"] = {"real_scale.alternating_reward": 1.0}
    if options.shared_prefix in ("true", "false"):
        model.setdefault("update", {})["shared_prefix"] = options.shared_prefix == "true"
    return model


def random_image_dataset(count: int, visual_tokens: int, seed: int = 0):
    """``count`` random-noise images of exactly ``visual_tokens`` Qwen2.5-VL visual tokens, with questions."""
    import datasets
    import numpy as np
    from PIL import Image

    rows = max(d for d in range(1, int(visual_tokens**0.5) + 1) if visual_tokens % d == 0)
    height, width = 28 * rows, 28 * (visual_tokens // rows)
    rng = np.random.default_rng(seed)
    question = (
        "As shown in the figure, the two lines are parallel and the angle marked in the diagram is 40 "
        "degrees. What is the measure of the angle x? Choices: A. 40 B. 50 C. 130 D. 140"
    )
    return datasets.Dataset.from_dict(
        {
            "image": [
                Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                for _ in range(count)
            ],
            "question": [question] * count,
            "answer": ["C"] * count,
            "id": [f"random-{index}" for index in range(count)],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "id": datasets.Value("string"),
            }
        ),
    )


def data_module(config: dict, model_folder: str, options, steps: int):
    """The config's VisualQADataModule settings on an in-memory set of random images."""
    from datamodules import VisualQADataModule

    settings = dict(config.get("data", {}).get("init_args", {}))
    for key in ("train", "val", "test", "processor_name_or_path"):
        settings.pop(key, None)
    prompts = options.prompts or settings.get("batch_size", 16)
    settings["batch_size"] = prompts
    visual_tokens = options.visual_tokens or (settings.get("max_pixels") or 401408) // PIXELS_PER_VISUAL_TOKEN
    settings["max_pixels"] = max(settings.get("max_pixels") or 0, visual_tokens * PIXELS_PER_VISUAL_TOKEN)
    if options.num_workers is not None:
        settings["num_workers"] = options.num_workers
    dataset = random_image_dataset(prompts * steps, visual_tokens)

    class RandomImages(VisualQADataModule):
        def _sources(self, stage):
            return [("random-images", dataset)] if stage == "train" else []

    return RandomImages(processor_name_or_path=model_folder, shuffle=False, keep_images=False, **settings)


def measured_module_class():
    """CPPOModule whose phases also record tensor memory (resident at the start, peak during)."""
    import torch
    from memory import TensorMemory

    from cppo_lightning import CPPOModule

    class MeasuredModule(CPPOModule):
        measure_from_step = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.phase_memory: dict[str, dict[str, float]] = {}

        def training_step(self, batch, batch_idx):
            # Warm-up steps are not measured (on the CPU the profiler would only slow them down).
            self._measuring = batch_idx >= self.measure_from_step
            return super().training_step(batch, batch_idx)

        @contextlib.contextmanager
        def phase(self, name):
            if not getattr(self, "_measuring", True):
                with super().phase(name):
                    yield
                return
            optimizers = [self.optimizers().optimizer] if self._trainer is not None else []
            resident = resident_tensor_bytes(self, optimizers) if self.device.type != "cuda" else None
            with super().phase(name), TensorMemory(self.device) as meter:
                yield
            start = meter.start if meter.start is not None else resident
            self.phase_memory[name] = {
                "resident": float(start),
                "transient": float(meter.peak),
                "peak": float(start + meter.peak),
                "reserved": float(meter.reserved) if meter.reserved is not None else None,
            }
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    return MeasuredModule


def run_child(options) -> dict:
    """One config: train warm-up + measured steps, return per-step phase times and memory (JSON)."""
    import lightning.pytorch as pl
    import torch

    from cppo_lightning.batch import ORIGINAL
    from cppo_lightning.update import GroupLengths, plan_grouped_micro_batches, plan_micro_batches

    torch.set_num_threads(os.cpu_count() or 1)
    config = load_config(options.child)
    steps = options.warmup + options.steps
    Module = measured_module_class()
    Module.measure_from_step = options.warmup
    module = Module(**module_arguments(config, options.model_folder, options))
    data = data_module(config, options.model_folder, options, steps)
    rows: list[dict] = []

    class Collect(pl.Callback):
        def on_train_batch_end(self, trainer, lightning_module, outputs, batch, batch_idx):
            rollout = lightning_module.last_rollout
            prompts = batch.prompt_lengths()
            prompt_lengths = [prompts[e] for e in rollout.example_rows.tolist()]
            completions = rollout.completion_mask.sum(1).tolist()
            positive = (rollout.advantages > 0).tolist()
            update = lightning_module.update_config
            views = len([r for r in lightning_module.objective.view_requests() if r.with_grad])
            view_rows = lightning_module.objective.view_rows(rollout.advantages.cpu()).tolist()
            stacked = [1 + (views if has else 0) for has in view_rows]
            every = list(range(len(rollout)))
            examples = rollout.example_rows.tolist()

            def grouped(stacked_rows):
                lengths = GroupLengths(examples, prompt_lengths, completions, stacked_rows)
                return plan_grouped_micro_batches(
                    every, lengths, update.micro_batch_rollouts, update.max_tokens_per_forward
                )

            plans = {
                "reference": plan_micro_batches(
                    every,
                    prompt_lengths,
                    completions,
                    [1] * len(every),
                    update.micro_batch_rollouts,
                    update.max_tokens_per_forward,
                ),
                "gradient": plan_micro_batches(
                    every,
                    prompt_lengths,
                    completions,
                    stacked,
                    update.micro_batch_rollouts,
                    update.max_tokens_per_forward,
                ),
            }
            if update.shared_prefix:
                plans = {"reference": grouped([1] * len(every)), "gradient": grouped(stacked)}
            metrics = trainer.callback_metrics
            grid = batch.model_inputs(ORIGINAL, list(range(len(batch)))).get("image_grid_thw")
            # The batch's tensors (pixel values of every view) live through the whole step.
            batch_bytes = sum(
                value.nbytes
                for view in batch.views
                for value in batch.model_inputs(view, list(range(len(batch)))).values()
            )
            visual = (
                grid.prod(-1).div(4, rounding_mode="floor").tolist() if grid is not None else []
            )  # 2 x 2 merge
            rows.append(
                {
                    "step": batch_idx,
                    "warmup": batch_idx < options.warmup,
                    "seconds": dict(lightning_module.phase_seconds),
                    "memory": dict(lightning_module.phase_memory),
                    "rollouts": len(rollout),
                    "prompt_tokens": sum(prompt_lengths),
                    "completion_tokens": sum(completions),
                    "completion_min": min(completions),
                    "visual_tokens": visual,
                    "batch_bytes": batch_bytes,
                    "positive_advantages": sum(positive),
                    "forwards": float(metrics.get("train/forwards", float("nan"))),
                    "prompt_tokens_saved": float(metrics.get("train/prompt_tokens_saved", float("nan"))),
                    "largest_forward_tokens": {k: max(p.tokens for p in v) for k, v in plans.items()},
                    "micro_batches": {k: len(v) for k, v in plans.items()},
                }
            )
            lightning_module.phase_memory = {}

    trainer = pl.Trainer(
        max_steps=steps,
        accelerator=options.accelerator,
        devices=1,
        precision=options.precision or config.get("trainer", {}).get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Collect()],
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    model = module.policy.model
    optimizer = module.optimizers().optimizer
    text_layer = layer_resident_bytes(model, "language_model.layers.0", optimizer)
    vision_layer = layer_resident_bytes(model, "visual.blocks.0", optimizer)
    info = json.loads((Path(options.model_folder) / "random_vlm.json").read_text())
    return {
        "config": str(options.child),
        "objective": type(module.objective).__name__,
        "finetuning": module.policy_config.finetuning,
        "precision": str(trainer.precision),
        "device": str(module.device),
        "device_name": torch.cuda.get_device_name(module.device)
        if module.device.type == "cuda"
        else platform.processor() or "cpu",
        "text_layers": info["text_layers"],
        "vision_layers": info["vision_layers"],
        "architecture": info["architecture"],
        "parameters": info["parameters"],
        "prompts": data.batch_size,
        "group": module.rollout_config.samples_per_prompt,
        "new_tokens": module.rollout_config.max_new_tokens,
        "visual_tokens": max(max(row["visual_tokens"], default=0) for row in rows),
        "max_tokens_per_forward": module.update_config.max_tokens_per_forward,
        "shared_prefix": module.update_config.shared_prefix,
        "text_layer_resident": text_layer,
        "vision_layer_resident": vision_layer,
        "steps": rows,
        "wall_s": time.perf_counter() - started,
    }


def measured(result: dict) -> list[dict]:
    """The steps after the warm-up."""
    return [row for row in result["steps"] if not row["warmup"]]


def summarize(result: dict) -> dict:
    """Per phase: median time, tokens/s, peak/resident memory (max over measured steps)."""
    import statistics

    rows = measured(result)
    summary = {}
    for phase in PHASES:
        seconds = statistics.median(row["seconds"].get(phase, 0.0) for row in rows)
        if phase == "rollout":
            tokens = statistics.median(row["completion_tokens"] for row in rows)
        else:  # the rollouts' tokens, prompt and completion: the same work for GRPO and CPPO
            tokens = statistics.median(row["prompt_tokens"] + row["completion_tokens"] for row in rows)
        memories = [row["memory"][phase] for row in rows if phase in row["memory"]]
        summary[phase] = {
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else float("nan"),
            "peak": max((m["peak"] for m in memories), default=float("nan")),
            "resident": max((m["resident"] for m in memories), default=float("nan")),
            "transient": max((m["transient"] for m in memories), default=float("nan")),
            "reserved": max((m["reserved"] or 0.0 for m in memories), default=0.0),
        }
    summary["step"] = {
        "seconds": sum(summary[p]["seconds"] for p in PHASES),
        "peak": max(_finite(summary[p]["peak"]) for p in PHASES),
        "reserved": max(summary[p]["reserved"] for p in PHASES),
    }
    summary["update"] = {
        "seconds": sum(summary[p]["seconds"] for p in UPDATE_PHASES),
        "peak": max(_finite(summary[p]["peak"]) for p in UPDATE_PHASES),
    }
    return summary


def _finite(value: float) -> float:
    return value if value == value else 0.0  # a phase that did not run has no memory figure


def print_table(results: dict[str, dict], note: str | None = None) -> None:
    names = list(results)
    first = results[names[0]]
    print(
        f"model: {first['architecture']} with random weights, {first['text_layers']} text / {first['vision_layers']} "
        f"vision layers ({first['parameters'] / 1e9:.2f} B parameters), {first['finetuning']}, "
        f"{first['precision']}; device {first['device']} ({first['device_name']}), {os.cpu_count()} CPU cores; "
        f"{datetime.date.today().isoformat()}"
    )
    print(
        f"sizes: {first['prompts']} prompts x G={first['group']}, {first['visual_tokens']} visual tokens per image, "
        f"completions of exactly {first['new_tokens']} tokens, max_tokens_per_forward {first['max_tokens_per_forward']}; "
        f"{len(measured(first))} measured step(s) after {len(first['steps']) - len(measured(first))} warm-up"
    )
    summaries = {name: summarize(result) for name, result in results.items()}
    header = "".join(f"{name:>12s}" for name in names)
    ratio = len(names) == 2
    if note:
        print(note)
    print(f"{'':34s}{header}{'ratio' if ratio else '':>8s}")

    def line(label, values, fmt):
        cells = "".join(f"{value:12{fmt}}" for value in values)
        extra = f"{values[1] / values[0]:8.2f}" if ratio and values[0] else ""
        print(f"{label:34s}{cells}{extra}")

    for phase in PHASES:
        if not any(summaries[n][phase]["seconds"] for n in names):
            continue  # e.g. no old-policy scoring with one optimizer step per rollout batch
        label = PHASE_LABELS[phase]
        line(f"{label} time (s)", [summaries[n][phase]["seconds"] for n in names], ".2f")
        unit = "generated tokens/s" if phase == "rollout" else "rollout tokens/s"
        line(f"  {unit}", [summaries[n][phase]["tokens_per_s"] for n in names], ".1f")
        line("  peak memory (GB)", [summaries[n][phase]["peak"] / GB for n in names], ".2f")
        line("    of it resident at its start", [summaries[n][phase]["resident"] / GB for n in names], ".2f")
    line("update time (s)", [summaries[n]["update"]["seconds"] for n in names], ".2f")
    line("update peak memory (GB)", [summaries[n]["update"]["peak"] / GB for n in names], ".2f")
    saved = [statistics_median(r, "prompt_tokens_saved") for r in results.values()]
    print(f"{'prompt tokens saved':34s}" + "".join(f"{value:12.2f}" for value in saved))
    line("step time (s)", [summaries[n]["step"]["seconds"] for n in names], ".2f")
    line("step peak memory (GB)", [summaries[n]["step"]["peak"] / GB for n in names], ".2f")
    if first["device"].startswith("cuda"):
        line("  allocator reserved, peak (GB)", [summaries[n]["step"]["reserved"] / GB for n in names], ".2f")
    if not first["device"].startswith("cuda"):
        print("(CPU: times include the memory profiler's overhead; memory is tracked tensor memory, not RSS)")


def statistics_median(result: dict, key: str) -> float:
    import statistics

    values = [row.get(key, float("nan")) for row in measured(result)]
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------- the fit


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b * x`` through ``(x, y)`` points (two points: the line through them).

    Raises:
        ValueError: fewer than two distinct ``x``.
    """
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        raise ValueError(f"need at least two different depths to fit, got {sorted(set(xs))}")
    n = len(points)
    mean_x = sum(xs) / n
    mean_y = sum(y for _, y in points) / n
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - b * mean_x, b


def phase_tokens(row: dict, phase: str) -> float:
    """The tokens a phase's transient memory grows with: every rollout's prompt and completion during
    generation (KV cache, prefill activations), the largest planned forward in the update's phases."""
    if phase == "rollout":
        return float(row["prompt_tokens"] + row["completion_tokens"])
    return float(row["largest_forward_tokens"][phase])


def _sizes(result: dict) -> tuple:
    return (result["prompts"], result["group"], result["new_tokens"], result["visual_tokens"])


def extrapolate(results: list[dict], text_layers: int, vision_layers: int) -> dict:
    """Memory per phase at ``text_layers``/``vision_layers`` from runs at smaller depths, same sizes.

    * resident memory (weights, quantization state, LoRA, gradients, optimizer state): the deepest
      run's, plus each missing layer's own tensors (counted in that run): exact, layers are identical;
    * transient memory of a phase (activations, KV cache, logit chunks): ``a + b * T`` fitted on the
      runs' text depths ``T``. Its depth-dependent part grows with decoder layers (KV cache during
      generation, checkpointed layer inputs in the gradient pass); the vision tower is frozen and runs
      without gradient, freeing each block's activations before the next, so its blocks add weights
      only. ``a`` holds what does not grow with depth: LM-head logit chunks, the embedding and head's
      casts, the vision tower's activations, the sampling step's logits.

    Returns:
        phase -> {"resident", "transient", "peak", "a", "b", "tokens"} (bytes; ``tokens`` see
        :func:`phase_tokens`).
    """
    base = max(results, key=lambda r: (r["text_layers"], r["vision_layers"]))
    resident_extra = (text_layers - base["text_layers"]) * base["text_layer_resident"] + (
        vision_layers - base["vision_layers"]
    ) * base["vision_layer_resident"]
    out = {}
    for phase in FIT_PHASES:
        points = [(r["text_layers"], summarize(r)[phase]["transient"]) for r in results]
        a, b = fit_line(points)
        resident = summarize(base)[phase]["resident"] + resident_extra
        transient = a + b * text_layers
        out[phase] = {
            "resident": resident,
            "transient": transient,
            "peak": resident + transient,
            "a": a,
            "b": b,
            "tokens": phase_tokens(measured(base)[0], phase),
        }
    return out


def config_sizes(config: dict, prompt_text_tokens: float) -> dict:
    """What a config's own RL step processes: rows, lengths, and each phase's tokens (see
    :func:`phase_tokens`), with the same reward pattern as the benchmark (half the rows A > 0)."""
    import torch

    from cppo_lightning.objectives import Objective, group_advantages
    from cppo_lightning.update import plan_micro_batches

    model, data = config["model"], config.get("data", {}).get("init_args", {})
    prompts, group = data.get("batch_size", 16), model["rollout"].get("samples_per_prompt", 5)
    new_tokens = model["rollout"].get("max_new_tokens", 1024)
    visual = (data.get("max_pixels") or 401408) // PIXELS_PER_VISUAL_TOKEN
    rows = prompts * group
    # The HF engine generates in calls of at most `generation_rollouts` rows: the KV cache holds one call's.
    generated = min(rows, model["rollout"].get("generation_rollouts") or rows)
    prompt = int(round(visual + prompt_text_tokens))
    objective = Objective.from_config(model["objective"])
    rewards = torch.tensor(alternating_reward([""] * rows, [""] * rows, [""] * rows))
    advantages = group_advantages(rewards, group, scale=objective.advantage_scale)
    views = len([r for r in objective.view_requests() if r.with_grad])
    stacked = [1 + (views if has else 0) for has in objective.view_rows(advantages).tolist()]
    update = model.get("update", {})
    budget, limit = update.get("max_tokens_per_forward"), update.get("micro_batch_rollouts", 8)
    every = list(range(rows))
    largest = {
        "reference": max(p.tokens for p in plan_micro_batches(every, [prompt] * rows, [new_tokens] * rows,
                                                                [1] * rows, limit, budget)),
        "gradient": max(p.tokens for p in plan_micro_batches(every, [prompt] * rows, [new_tokens] * rows,
                                                               stacked, limit, budget)),
    }  # fmt: skip
    return {
        "prompts": prompts,
        "group": group,
        "new_tokens": new_tokens,
        "visual_tokens": visual,
        "prompt_tokens": prompt,
        "tokens": {
            "rollout": float(generated * (prompt + new_tokens)),
            **{k: float(v) for k, v in largest.items()},
        },
    }


def estimate_at_sizes(depth: dict, size_runs: list[dict], target: dict, text_layers: int) -> dict:
    """Scale a depth extrapolation (:func:`extrapolate`) to other sizes: transient = alpha + beta * N +
    gamma * T * N with N a phase's tokens (:func:`phase_tokens`) and T the text layers.

    ``gamma`` is the fitted per-layer slope divided by the depth runs' N (KV cache and checkpointed
    inputs grow with layers times tokens); ``alpha`` and ``beta`` split the depth-independent part ``a``
    using a run at other sizes. Without one, ``a`` is taken as proportional to N (conservative: it holds
    parts that do not grow with N). ``target`` has ``tokens`` per phase (see :func:`config_sizes`).

    Returns:
        phase -> {"alpha", "beta", "gamma", "transient"} (bytes).
    """
    out = {}
    for phase in FIT_PHASES:
        fit = depth[phase]
        n1, gamma = fit["tokens"], fit["b"] / fit["tokens"]
        alpha, beta = 0.0, fit["a"] / n1
        for run in size_runs:
            row = measured(run)[0]
            n2 = phase_tokens(row, phase)
            if n2 != n1:
                own = summarize(run)[phase]["transient"] - gamma * run["text_layers"] * n2
                beta = (own - fit["a"]) / (n2 - n1)
                alpha = fit["a"] - beta * n1
        n = target["tokens"][phase]
        out[phase] = {
            "alpha": alpha,
            "beta": beta,
            "gamma": gamma,
            "transient": alpha + beta * n + gamma * text_layers * n,
        }
    return out


def print_fit(
    paths: list[str], text_layers: int | None, vision_layers: int | None, sizes_of: str | None
) -> dict:
    from cppo_lightning.models.tiny import REAL_ARCHITECTURES

    loaded = [json.loads(Path(path).read_text()) for path in paths]
    by_objective: dict[str, list[dict]] = {}
    for run in loaded:
        for name, result in run["results"].items():
            by_objective.setdefault(name, []).append(result)
    some = loaded[0]["results"][next(iter(loaded[0]["results"]))]
    arch = REAL_ARCHITECTURES[some["architecture"]]
    text_layers = text_layers or arch.text_layers
    vision_layers = vision_layers or arch.vision_layers
    fitted = {}
    for name, results in by_objective.items():
        groups: dict[tuple, list[dict]] = {}
        for result in results:
            groups.setdefault(_sizes(result), []).append(result)
        sizes = max(groups, key=lambda key: len({r["text_layers"] for r in groups[key]}))
        runs = groups[sizes]
        others = [r for key, group in groups.items() if key != sizes for r in group]
        depths = sorted({(r["text_layers"], r["vision_layers"]) for r in runs})
        first = runs[0]
        print(
            f"{name}: EXTRAPOLATION (not a measurement) of {first['architecture']} {first['finetuning']} to "
            f"{text_layers} text / {vision_layers} vision layers from (text, vision) depths {depths} at "
            f"{sizes[0]} prompts x G={sizes[1]}, {sizes[2]} new tokens, {sizes[3]} visual tokens; one text layer "
            f"keeps {first['text_layer_resident'] / 1e6:.1f} MB resident, one vision block "
            f"{first['vision_layer_resident'] / 1e6:.1f} MB"
        )
        depth = extrapolate(runs, text_layers, vision_layers)
        fitted[name] = {"depth": depth}
        for phase in FIT_PHASES:
            values = depth[phase]
            print(
                f"  {PHASE_LABELS[phase]:18s} peak {values['peak'] / GB:7.2f} GB = resident {values['resident'] / GB:6.2f}"
                f" + transient {values['transient'] / GB:6.2f} (a = {values['a'] / GB:.3f} GB, "
                f"b = {values['b'] / 1e6:.2f} MB per text layer, at {values['tokens']:.0f} tokens)"
            )
        print(f"  step peak at these sizes {max(v['peak'] for v in depth.values()) / GB:.2f} GB")
        if not sizes_of:
            continue
        config = load_config(sizes_of)
        row = measured(first)[0]
        text_tokens = row["prompt_tokens"] / row["rollouts"] - first["visual_tokens"]
        target = config_sizes(config, text_tokens)
        scaled = estimate_at_sizes(depth, others, target, text_layers)
        # The batch's tensors (pixel values of each view) scale with prompts x visual tokens. (On CUDA the
        # resident memory already holds them, at the measured sizes.)
        scale = (target["prompts"] * target["visual_tokens"]) / (first["prompts"] * first["visual_tokens"])
        batch = 0.0 if first["device"].startswith("cuda") else row.get("batch_bytes", 0) * scale
        basis = (
            "a size run at " + ", ".join(str(_sizes(r)) for r in others)
            if others
            else "no size run (conservative)"
        )
        print(
            f"  ESTIMATE at {sizes_of}'s sizes ({target['prompts']} prompts x G={target['group']}, "
            f"{target['new_tokens']} new tokens, {target['visual_tokens']} visual tokens, prompts of "
            f"{target['prompt_tokens']} tokens; {basis}); batch tensors {batch / GB:.2f} GB"
        )
        fitted[name]["estimate"] = {}
        for phase in FIT_PHASES:
            values = scaled[phase]
            peak = depth[phase]["resident"] + batch + values["transient"]
            fitted[name]["estimate"][phase] = peak
            print(
                f"    {PHASE_LABELS[phase]:18s} peak {peak / GB:7.2f} GB: transient {values['transient'] / GB:6.2f} = "
                f"{values['alpha'] / GB:.3f} GB + {values['beta']:.0f} B x {target['tokens'][phase]:.0f} tokens + "
                f"{values['gamma']:.0f} B x {text_layers} layers x tokens"
            )
        print(f"    step peak {max(fitted[name]['estimate'].values()) / GB:.2f} GB")
    return fitted


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the method's LightningCLI config")
    parser.add_argument(
        "--baseline",
        default=None,
        help="the baseline's config (default: the config's GRPO twin, cppo -> grpo)",
    )
    parser.add_argument(
        "--model", default="random:qwen2_5_vl-3b", help="a random: spec, tiny: spec or model folder"
    )
    parser.add_argument("--text-layers", type=int, help="cut the random model's decoder depth")
    parser.add_argument("--vision-layers", type=int, help="cut the random model's vision depth")
    parser.add_argument("--finetuning", choices=["full", "lora", "qlora"], help="override the configs' mode")
    parser.add_argument("--precision", help="override the configs' trainer precision (e.g. 32-true)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--prompts", type=int, help="prompts per step (default: the config's batch_size)")
    parser.add_argument("--group", type=int, help="G (default: the config's)")
    parser.add_argument("--new-tokens", type=int, help="exact completion length (default: the config's max)")
    parser.add_argument(
        "--visual-tokens", type=int, help="visual tokens per image (default: the config's cap)"
    )
    parser.add_argument("--num-workers", type=int, help="data workers (default: the config's)")
    parser.add_argument(
        "--shared-prefix",
        choices=["config", "true", "false", "both"],
        default="config",
        help="update.shared_prefix: the configs' (default), forced on or off, or both: each objective "
        "grouped and per row in one run, with the per-row/grouped ratios",
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--steps", type=int, default=1, help="measured steps")
    parser.add_argument("--json", help="write the results here (input of --fit)")
    parser.add_argument(
        "--fit", nargs="+", metavar="JSON", help="extrapolate the memory of earlier runs in depth"
    )
    parser.add_argument("--fit-text-layers", type=int, help="depth to extrapolate to (default: released)")
    parser.add_argument(
        "--fit-vision-layers", type=int, help="vision depth to extrapolate to (default: released)"
    )
    parser.add_argument(
        "--estimate-for", metavar="CONFIG", help="with --fit: also estimate at this config's own sizes"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-folder", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_arguments(options, config: str, folder: str) -> list[str]:
    args = [sys.executable, __file__, "--child", config, "--model-folder", folder]
    for flag in (
        "finetuning",
        "precision",
        "accelerator",
        "prompts",
        "group",
        "new_tokens",
        "visual_tokens",
        "num_workers",
        "shared_prefix",
    ):
        value = getattr(options, flag)
        if value is not None:
            args += [f"--{flag.replace('_', '-')}", str(value)]
    return args + ["--warmup", str(options.warmup), "--steps", str(options.steps)]


@contextlib.contextmanager
def model_folder(options):
    """The model to benchmark: a random: spec is built into a temporary folder, deleted afterwards."""
    import torch

    from cppo_lightning.models.loading import resolve_model_path
    from cppo_lightning.models.tiny import build_random_vlm, is_random_spec, parse_random_spec

    if not is_random_spec(options.model):
        yield resolve_model_path(options.model)
        return
    arguments = parse_random_spec(options.model)
    if options.text_layers:
        arguments["text_layers"] = options.text_layers
    if options.vision_layers:
        arguments["vision_layers"] = options.vision_layers
    device = "cuda" if torch.cuda.is_available() and options.accelerator in ("auto", "gpu", "cuda") else "cpu"
    folder = Path(tempfile.mkdtemp(prefix="cppo-real-scale-"))
    try:
        started = time.perf_counter()
        build_random_vlm(folder / "model", device=device, **arguments)
        print(f"built {options.model} {arguments} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        yield str(folder / "model")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> None:
    options = parse_args(argv)
    # A terminated run still deletes its model folder (and subprocess.run kills the child).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if options.child:
        print(json.dumps(run_child(options)))
        return
    if options.fit:
        print_fit(options.fit, options.fit_text_layers, options.fit_vision_layers, options.estimate_for)
        return
    baseline = options.baseline or options.config.replace("cppo", "grpo")
    configs = {}
    for path in (baseline, options.config):
        objective = load_config(path)["model"]["objective"]["class_path"].rpartition(".")[2]
        configs[objective] = path
    modes = {"both": ("true", "false")}.get(options.shared_prefix, (options.shared_prefix,))
    results = {}
    with model_folder(options) as folder:
        for name, path in configs.items():
            for mode in modes:
                label = name if len(modes) == 1 else f"{name} {'grouped' if mode == 'true' else 'per-row'}"
                arguments = child_arguments(
                    argparse.Namespace(**{**vars(options), "shared_prefix": mode}), path, folder
                )
                child = subprocess.run(arguments, stdout=subprocess.PIPE, text=True, check=False)
                if child.returncode:
                    raise SystemExit(f"{label} run ({path}) failed with exit code {child.returncode}")
                results[label] = json.loads(child.stdout.strip().splitlines()[-1])
    if len(modes) == 1:
        print_table(results)
    else:
        for name in configs:
            pair = {label.split()[1]: results[label] for label in results if label.split()[0] == name}
            print_table(
                {"grouped": pair["grouped"], "per-row": pair["per-row"]},
                note=f"{name}: update.shared_prefix true (grouped) and false (per-row); ratio = per-row / "
                "grouped (> 1: the grouped update is faster or smaller)",
            )
            print()
    if options.json:
        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json).write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))


if __name__ == "__main__":
    main()
