"""Lightning callbacks for RL fine-tuning runs, and run comparison plots.

- :class:`PerceptionTokenVisualizer`: views, entropy shifts and CPPO's perception tokens (HTML + PNG).
- :class:`RolloutSamplesLogger`: rollout samples as JSON lines.
- :class:`ThroughputMonitor`: whole-job throughput, rollout/update time split, peak memory.
- :func:`plot_runs`: overlay the curves of several runs (``cppo plot``).
"""

from callbacks.perception import PerceptionTokenVisualizer
from callbacks.plots import plot_runs
from callbacks.rollout_log import RolloutSamplesLogger
from callbacks.throughput import ThroughputMonitor

__all__ = ["PerceptionTokenVisualizer", "RolloutSamplesLogger", "ThroughputMonitor", "plot_runs"]
