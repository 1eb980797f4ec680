"""Throughput of the whole job and peak memory, from the timings ``CPPOModule`` already logs.

The module logs per-rank timings (``time/rollout_s``, ``time/update_s``) and rates
(``throughput/generated_tokens_per_s``, ``throughput/update_rollouts_per_s``). This callback adds, each
training step:

==============================================  =========================================================
``throughput/generated_tokens_per_s_all_ranks``  the module's per-rank rate summed over ranks: the job's
                                                 sampling throughput
``throughput/update_rollouts_per_s_all_ranks``   the same for the update (rollouts per second)
``throughput/rollout_time_fraction``             ``rollout_s / (rollout_s + update_s)``, mean over ranks
``throughput/step_s``                            wall time of the training step, from the batch's start
                                                 to this callback's end hook (list it last to include
                                                 the other callbacks), max over ranks
``memory/peak_gb``                               peak memory since the process started, in GiB, max over
                                                 ranks: CUDA ``max_memory_allocated`` on a GPU, else the
                                                 process's peak resident set
==============================================  =========================================================

With one process the ``_all_ranks`` rates equal the module's own.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning.pytorch as pl
import torch
from typing_extensions import override

_GIB = 2**30


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA allocations on a CUDA device, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _GIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / _GIB if sys.platform == "darwin" else peak * 1024 / _GIB


class ThroughputMonitor(pl.Callback):
    """Log whole-job throughput, the rollout/update time split and peak memory every training step.

    Every rank must run it (the values are reduced over ranks); the logger writes rank zero's result.
    Metrics the module did not log (another LightningModule) are skipped; peak memory is always logged.
    """

    def __init__(self) -> None:
        self._started: float | None = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        self._started = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        metrics = trainer.callback_metrics
        sums, means, maxima = {}, {}, {}
        for source, target in (
            ("throughput/generated_tokens_per_s", "throughput/generated_tokens_per_s_all_ranks"),
            ("throughput/update_rollouts_per_s", "throughput/update_rollouts_per_s_all_ranks"),
        ):
            if source in metrics:
                sums[target] = float(metrics[source])
        if "time/rollout_s" in metrics and "time/update_s" in metrics:
            rollout, update = float(metrics["time/rollout_s"]), float(metrics["time/update_s"])
            means["throughput/rollout_time_fraction"] = rollout / max(rollout + update, 1e-9)
        if self._started is not None:
            maxima["throughput/step_s"] = time.perf_counter() - self._started
        maxima["memory/peak_gb"] = peak_memory_gb(pl_module.device)
        batch_size = len(batch) if hasattr(batch, "__len__") else 1
        for values, reduce in ((sums, "sum"), (means, "mean"), (maxima, "max")):
            for name, value in values.items():
                pl_module.log(
                    name,
                    torch.tensor(value, dtype=torch.float32, device=pl_module.device),
                    on_step=True,
                    on_epoch=False,
                    sync_dist=True,
                    reduce_fx=reduce,
                    batch_size=batch_size,
                )
