"""What the FSDP2 lane of ``benchmarks/gpu_check.sh`` prints: peak memory, step times, checkpoint size.

Usage: ``python benchmarks/gpu_check_report.py runs/gpu_check_fsdp2`` (the run's ``save_dir``).
"""

import csv
import pathlib
import sys


def main(folder: str) -> None:
    metrics = next(pathlib.Path(folder).rglob("metrics.csv"))
    with open(metrics) as handle:
        rows = list(csv.DictReader(handle))

    def column(key: str) -> list[float]:
        return [float(row[key]) for row in rows if row.get(key)]

    peak, steps = column("memory/peak_gb"), column("throughput/step_s")
    checkpoint = next(metrics.parent.rglob("last.ckpt"), None)
    files = [path for path in checkpoint.rglob("*") if path.is_file()] if checkpoint else []
    size = sum(path.stat().st_size for path in files) / 2**30
    print(
        f"FSDP2 lane: peak memory per device {max(peak, default=float('nan')):.2f} GiB (max over ranks), "
        f"step times {', '.join(f'{s:.1f}' for s in steps)} s, sharded checkpoint {size:.2f} GiB "
        f"in {len(files)} files"
    )


if __name__ == "__main__":
    main(sys.argv[1])
