"""Per-image cost of the image views and generation rate of the synthetic task (a benchmark, not a test).

Run: ``NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/perturbation_speed.py [--repeats 300]``

Images are synthetic-task scenes rendered at each size (realistic content: flat shapes, clutter).
Each default transform is timed with ``p`` forced to 1 (its cost when drawn), then each pool as configured
(uniform draw, own ``p``), then the per-prompt work of the DataModule: ``ViewMaker`` for CPPO (I+ and I-)
and PAPO (masked). Target: well under 5 ms per image at 224 px.

Last, PAPO's masked view drawn as PAPO draws it (on the raw image, then resized into the pixel limits like
the original) against masking the already resized image: the extra cost is one resize of the masked raw
image per prompt, the same as the resize every example already pays for its original view.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules.examples import ImageLimits, fit_pixels  # noqa: E402
from datamodules.perturbations import (  # noqa: E402
    MASKED,
    PRESERVING,
    REMOVING,
    PerturbationPool,
    ViewMaker,
    information_preserving_transforms,
    information_removing_transforms,
    papo_masking_pool,
    papo_masking_transforms,
)
from datamodules.synthetic import (  # noqa: E402
    SyntheticTaskConfig,
    generate_example,
    generate_split,
    to_hf_dataset,
)


def time_calls(fn, repeats: int) -> tuple[float, float]:
    """Mean and 95th percentile of ``fn(i)`` in ms, after a few warm-up calls."""
    for i in range(5):
        fn(-1 - i)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.fmean(times), float(np.percentile(times, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per row")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="square image sides, px")
    parser.add_argument("--examples", type=int, default=1000, help="synthetic examples to generate")
    args = parser.parse_args()

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, OpenCV threads {cv2.getNumThreads()}")
    print(f"{args.repeats} timed calls per row, ms per image (mean / p95)\n")
    print(f"{'what':44s}" + "".join(f"{f'{s} px':>18s}" for s in args.sizes))

    images = {
        size: np.asarray(generate_example(SyntheticTaskConfig(image_size=size), "train", 0, seed=0).image)
        for size in args.sizes
    }
    rows: list[tuple[str, object]] = []
    for view, factory in (
        (PRESERVING, information_preserving_transforms),
        (REMOVING, information_removing_transforms),
        (MASKED, papo_masking_transforms),
    ):
        for transform in factory():
            transform.p = 1.0
            name = f"{view:10s} {type(transform).__name__} (p=1)"
            rows.append((name, PerturbationPool([transform], view=view)))
        rows.append((f"{view:10s} pool as configured", PerturbationPool(view=view)))
    # The package's earlier I+ perspective (albumentations' own, another distribution), for the cost.
    earlier = A.Perspective(
        scale=(0.0627, 0.0627),
        keep_size=True,
        fit_output=True,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        p=1.0,
    )
    rows.append(
        (f"{PRESERVING:10s} A.Perspective (earlier, p=1)", PerturbationPool([earlier], view=PRESERVING))
    )
    rows.append(("ViewMaker CPPO (I+ and I-)", ViewMaker(views=(PRESERVING, REMOVING))))
    rows.append(("ViewMaker PAPO (masked)", ViewMaker(views=(MASKED,))))

    for name, maker in rows:
        cells = []
        for size in args.sizes:
            image = images[size]
            mean, p95 = time_calls(lambda i: maker(image, seed=0, epoch=0, example_id=str(i)), args.repeats)
            cells.append(f"{mean:8.3f} / {p95:6.3f}")
        print(f"{name:44s}" + "".join(f"{c:>18s}" for c in cells))

    limits = ImageLimits(max_pixels=448 * 448, factor=28)
    print(f"\nPAPO masked view, raw image resized into {limits.max_pixels} pixels (448 x 448), ms per prompt")
    before = ViewMaker(views=(MASKED,))
    after = ViewMaker(views=(MASKED,), masked=papo_masking_pool(before_resize=False))
    for side in (896, 1792):
        raw = np.asarray(generate_example(SyntheticTaskConfig(image_size=side), "train", 0, seed=0).image)

        def resize(array):
            return np.asarray(fit_pixels(Image.fromarray(array), limits))

        image = resize(raw)
        timings = {
            "resize of the original (every example)": time_calls(lambda i: resize(raw), args.repeats)[0]
        }
        for label, maker, extra in (
            ("mask the resized image", after, {}),
            ("mask the raw image, then resize (PAPO)", before, {"raw": raw, "resize": resize}),
        ):
            timings[label] = time_calls(
                lambda i, maker=maker, extra=extra: maker(image, seed=0, epoch=0, example_id=str(i), **extra),
                args.repeats,
            )[0]
        ratio = timings["mask the raw image, then resize (PAPO)"] / timings["mask the resized image"]
        print(
            f"  raw {side} px: "
            + ", ".join(f"{label} {value:.2f}" for label, value in timings.items())
            + f"  (ratio {ratio:.1f}x)"
        )

    config = SyntheticTaskConfig()
    start = time.perf_counter()
    examples = generate_split(config, "train", args.examples, seed=0)
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    to_hf_dataset(examples)
    encode_s = time.perf_counter() - start
    print(
        f"\nsynthetic task, {config.image_size} px: {args.examples} examples in {generate_s:.2f} s "
        f"({args.examples / generate_s:,.0f} examples/s); to_hf_dataset (PNG encoding) {encode_s:.2f} s "
        f"({args.examples / encode_s:,.0f} examples/s)"
    )


if __name__ == "__main__":
    main()
