"""Throughput of the training data path on this machine (a benchmark, not a test).

Run: ``.venv/bin/python benchmarks/data_throughput.py [--examples 64] [--sizes 224 448]``

The path timed is what a training step waits for: decode the stored image, fit it into the pixel limits,
draw the views (``I+`` and ``I-`` for CPPO), run the processor once per view, and collate into a
``PromptBatch``. The data is the synthetic perception task at each image size; the processor is the tiny
Qwen2.5-VL's, built with ``image_size=448`` so that 448 px images are not downscaled by it (a real
Qwen2.5-VL keeps them too). Set-up (the once-per-run example checks) is not timed.

Rows:
- per-stage cost in one process (ms per example), measured stage by stage on the same examples;
- the DataLoader end to end (samples/s) with 0, 1 and 2 workers, for CPPO (3 views) and GRPO (1 view);
- the perturbations alone (``ViewMaker`` for I+ and I-, ms per image).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from cppo_lightning.batch import ORIGINAL, PRESERVING, REMOVING, PromptBatch  # noqa: E402
from cppo_lightning.models import build_tiny_vlm  # noqa: E402
from datamodules import SyntheticTaskConfig, SyntheticVQADataModule  # noqa: E402
from datamodules.examples import clean_answer, clean_question  # noqa: E402
from datamodules.perturbations import ViewMaker  # noqa: E402


def datamodule(model: str, size: int, examples: int, batch_size: int, views: list[str], workers: int):
    dm = SyntheticVQADataModule(
        task=SyntheticTaskConfig(image_size=size),
        train_size=examples,
        val_size=0,
        test_size=0,
        processor_name_or_path=model,
        batch_size=batch_size,
        views=views,
        num_workers=workers,
        seed=0,
    )
    dm.setup("fit")
    return dm


def stage_costs(dm, repeats: int) -> dict[str, float]:
    """Mean ms per example of each stage, run by hand in this process on every training example."""
    dataset = dm.datasets["train"][0]
    totals = {"decode + fit pixels": [], "views I+ and I-": [], "processor, 3 views": [], "collate": []}
    for _ in range(repeats):
        encoded = []
        for index in range(len(dataset)):
            row = dataset.dataset[dataset.rows[index]]
            start = time.perf_counter()
            image = dataset.image(index)
            decoded = time.perf_counter()
            views = dataset.view_maker(image, seed=dataset.seed, epoch=0, example_id=dataset.ids[index])
            viewed = time.perf_counter()
            encoded.append(
                dataset.encoder.encode(
                    dataset.ids[index],
                    views,
                    clean_question(row[dataset.columns["question"]]),
                    clean_answer(row[dataset.columns["answer"]]),
                    keep_images=dataset.keep_images,
                )
            )
            done = time.perf_counter()
            totals["decode + fit pixels"].append(decoded - start)
            totals["views I+ and I-"].append(viewed - decoded)
            totals["processor, 3 views"].append(done - viewed)
        for first in range(0, len(encoded) - dm.batch_size + 1, dm.batch_size):
            start = time.perf_counter()
            PromptBatch.from_examples(encoded[first : first + dm.batch_size], dm._pad_token_id())
            totals["collate"].append((time.perf_counter() - start) / dm.batch_size)
    return {name: 1e3 * statistics.fmean(values) for name, values in totals.items()}


def loader_rate(dm, epochs: int) -> tuple[float, int]:
    """Samples/s through the training DataLoader (worker start-up included, as in training), and tokens."""
    loader = dm.train_dataloader()
    samples, tokens = 0, 0
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            samples += len(batch)
            tokens = batch.prompt_length
    return samples / (time.perf_counter() - start), tokens


def perturbation_ms(dm, repeats: int) -> float:
    """ms per image of drawing I+ and I- (the default pools), on the decoded training images."""
    dataset = dm.datasets["train"][0]
    images = [dataset.image(index) for index in range(len(dataset))]
    maker = ViewMaker((PRESERVING, REMOVING))
    for index in range(3):
        maker(images[index % len(images)], seed=1, epoch=0, example_id="warm-up")
    start = time.perf_counter()
    for epoch in range(repeats):
        for index, image in enumerate(images):
            maker(image, seed=0, epoch=epoch, example_id=str(index))
    return 1e3 * (time.perf_counter() - start) / (repeats * len(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="square image sides, px")
    parser.add_argument("--examples", type=int, default=64, help="synthetic training examples per size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="DataLoader epochs timed per row")
    parser.add_argument(
        "--repeats", type=int, default=2, help="passes over the examples for the per-stage rows"
    )
    args = parser.parse_args()

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}"
    )
    print(
        f"synthetic task, {args.examples} examples, batch {args.batch_size}, tiny Qwen2.5-VL processor (<= 448 px)\n"
    )

    with tempfile.TemporaryDirectory() as folder:
        model = str(build_tiny_vlm(folder, "qwen2_5_vl", "smoke", image_size=448))
        cppo = [ORIGINAL, PRESERVING, REMOVING]
        results: dict[int, dict[str, str]] = {}
        for size in args.sizes:
            row: dict[str, str] = {}
            dm = datamodule(model, size, args.examples, args.batch_size, cppo, workers=0)
            costs = stage_costs(dm, args.repeats)
            for name, value in costs.items():
                row[f"  {name} (ms/example)"] = f"{value:.2f}"
            row["  sum of stages (ms/example)"] = f"{sum(costs.values()):.2f}"
            row["perturbation alone, I+ and I- (ms/image)"] = f"{perturbation_ms(dm, args.repeats):.2f}"
            for views, label in ((cppo, "CPPO, 3 views"), ([ORIGINAL], "GRPO, 1 view")):
                for workers in (0, 1, 2):
                    rate, tokens = loader_rate(
                        datamodule(model, size, args.examples, args.batch_size, views, workers), args.epochs
                    )
                    row[f"DataLoader {label}, {workers} workers (samples/s)"] = f"{rate:.0f}"
            row["prompt length (tokens)"] = str(tokens)
            results[size] = row

    names = list(next(iter(results.values())))
    width = max(len(name) for name in names) + 2
    print(f"{'':{width}s}" + "".join(f"{f'{size} px':>10s}" for size in results))
    print("one process, per stage:")
    for name in names:
        print(f"{name:{width}s}" + "".join(f"{results[size][name]:>10s}" for size in results))


if __name__ == "__main__":
    main()
