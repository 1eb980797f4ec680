"""Lightning callbacks for RL fine-tuning runs, and run comparison plots.

- :class:`PerceptionTokenVisualizer`: views, entropy shifts and CPPO's perception tokens (HTML + PNG).
- :class:`RolloutSamplesLogger`: rollout samples as JSON lines.
- :class:`ThroughputMonitor`: whole-job throughput, rollout/update time split, peak memory.
- :class:`AdapterExport`: the LoRA adapter in PEFT format (with the processor) beside every checkpoint.
- :class:`EvaluationReport`: avg@k ± std over the k samples per benchmark, in the paper's table layout.
- :class:`CPLDirectionMonitor`: one early warning when the perturbation pools push CPPO's CPL the wrong way.
- :class:`AtomicCheckpoint`: ``ModelCheckpoint`` whose files are complete or absent (temporary file, fsync, rename).
- :class:`PreemptionCheckpoint`: on SIGTERM/SIGINT, save at the step boundary and exit with ``128 + signal``.
- :class:`~callbacks.run_lock.RunLock`: one writer per run folder (``cppo fit`` holds it).
- :func:`plot_runs`: overlay the curves of several runs (``cppo plot``).
"""

from callbacks.checkpointing import AtomicCheckpoint
from callbacks.cpl_direction import CPLDirectionMonitor
from callbacks.evaluation import EvaluationReport
from callbacks.export import AdapterExport
from callbacks.perception import PerceptionTokenVisualizer
from callbacks.plots import plot_groups, plot_runs
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
    "plot_groups",
    "plot_runs",
]
