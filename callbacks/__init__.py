"""Lightning callbacks for RL fine-tuning runs.

- :class:`PerceptionTokenVisualizer`: views, entropy shifts and CPPO's perception tokens (HTML + PNG).
- :class:`RolloutSamplesLogger`: rollout samples as JSON lines.
- :class:`ThroughputMonitor`: whole-job throughput, rollout/update time split, peak memory.
- :class:`AdapterExport`: the LoRA adapter in PEFT format (with the processor) beside every checkpoint.
- :class:`EvaluationReport`: avg@k ± std over the k samples per benchmark, in the paper's table layout.
- :class:`CPLDirectionMonitor`: one early warning when the perturbation pools push CPPO's CPL the wrong way.
- :class:`AtomicCheckpoint`: ``ModelCheckpoint`` whose files are complete or absent (temporary file, fsync, rename).
- :class:`PreemptionCheckpoint`: on SIGTERM/SIGINT, save at the step boundary and exit with ``128 + signal``.

The run comparison plots (``cppo plot``) are in :mod:`cppo_lightning.plots`.
"""

from callbacks.checkpointing import AtomicCheckpoint
from callbacks.cpl_direction import CPLDirectionMonitor
from callbacks.evaluation import EvaluationReport
from callbacks.export import AdapterExport
from callbacks.perception import PerceptionTokenVisualizer
from callbacks.preemption import PreemptionCheckpoint
from callbacks.rollout_log import RolloutSamplesLogger
from callbacks.throughput import ThroughputMonitor

__all__ = [
    "AdapterExport",
    "AtomicCheckpoint",
    "CPLDirectionMonitor",
    "EvaluationReport",
    "PerceptionTokenVisualizer",
    "PreemptionCheckpoint",
    "RolloutSamplesLogger",
    "ThroughputMonitor",
]


def __getattr__(name: str):
    """``callbacks.plot_runs`` / ``plot_groups``: deprecated, moved to :mod:`cppo_lightning.plots`."""
    if name in ("plot_groups", "plot_runs"):
        import warnings

        from cppo_lightning import plots

        warnings.warn(f"callbacks.{name} moved to cppo_lightning.plots", DeprecationWarning, stacklevel=2)
        return getattr(plots, name)
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
