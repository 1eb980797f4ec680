"""Preemption: on SIGTERM / SIGINT, finish the step, save a resumable checkpoint, exit non-zero.

A scheduler that preempts a job sends SIGTERM and, some seconds later, SIGKILL. Lightning alone stops
after the current step with exit status 0 and no checkpoint: everything since the last periodic checkpoint
is lost and the job looks successful. With :class:`PreemptionCheckpoint` the step in progress completes
(rollout and update are never cut in half), a checkpoint of exactly that state is written atomically at
the same point where ``ModelCheckpoint`` writes its periodic ones (so resuming from it reproduces an
uninterrupted run), and the process exits with status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT),
which schedulers and shells read as "killed by that signal". A signal during validation stops the
validation at its next batch (its partial metrics are not logged) and saves. A second Ctrl+C stops at once,
unsaved, with status 130.

Under SLURM with Lightning's ``SLURMEnvironment(auto_requeue=True)`` (its default when SLURM is detected),
the environment's requeue signal (``SIGUSR1``; ask for it with ``#SBATCH --signal=SIGUSR1@90``) is handled
the same way and the job is requeued with ``scontrol requeue`` afterwards; the requeued job resumes from
that checkpoint (``cppo fit`` treats a SLURM restart as ``--ckpt_path last``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from typing_extensions import override

from callbacks.checkpointing import AtomicCheckpoint, save_atomically

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is saved; the exit status is ``128 + signal number``."""


def _signal_number(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    try:
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; e.g. SIGTERM, SIGINT, SIGUSR1") from None


def _slurm_requeue_signal(trainer: pl.Trainer) -> signal.Signals | None:
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return signal.Signals(environment.requeue_signal)
    return None


def requeue_slurm_job() -> int:
    """``scontrol requeue`` the current SLURM job (as Lightning's own auto-requeue does); returns its status."""
    job_id = SLURMEnvironment.job_id()
    if job_id is None:
        log.warning("not requeuing: no SLURM job id in the environment")
        return 1
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else str(job_id)
    status = subprocess.call(["scontrol", "requeue", job])
    if status == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.warning("requeuing SLURM job %s failed with status %d", job, status)
    return status


class PreemptionCheckpoint(pl.Callback):
    """Save a resumable checkpoint at the step boundary after SIGTERM/SIGINT, then exit with ``128 + signal``.

    The checkpoint goes through the trainer's :class:`~callbacks.AtomicCheckpoint` (``last.ckpt`` and the
    adapter export), or, without one, atomically to ``<checkpoint dir>/last.ckpt``. Signals are handled
    only while training; before the first step there is nothing to save and they act as usual.

    Args:
        signals: the signals to handle.
        requeue: under SLURM with auto-requeue, also handle the requeue signal and requeue the job.
    """

    def __init__(self, signals: list[str] | None = None, requeue: bool = True) -> None:
        self.signals = [_signal_number(name) for name in (signals or ["SIGTERM", "SIGINT"])]
        self.requeue = requeue
        self.received: signal.Signals | None = None
        self.saved: str | None = None
        self._previous: dict[int, object] = {}
        self._stop = False

    # ------------------------------------------------------------------ signals

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                # A second Ctrl+C: stop now, without a checkpoint, with the status of an interrupted
                # process (Lightning turns a KeyboardInterrupt into status 1).
                sys.stderr.write("\nsecond Ctrl+C: stopping now, without saving\n")
                raise Preempted(128 + signal.SIGINT)
            return
        self.received = signal.Signals(signum)
        sys.stderr.write(
            f"\nreceived {self.received.name}: finishing this step, saving a checkpoint, then exiting "
            "(Ctrl+C again to stop at once without saving)\n"
        )

    def _install(self, trainer: pl.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: not in the main thread, signals are not handled")
            return
        wanted = list(self.signals)
        requeue_signal = _slurm_requeue_signal(trainer) if self.requeue else None
        if requeue_signal is not None:
            wanted.append(requeue_signal)
        for signum in dict.fromkeys(wanted):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs its own SIGTERM handler just before training starts: replace it here.
        self.received, self.saved, self._stop = None, None, False
        self._install(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training finished at the step that saved: the run is complete, nothing is lost, exit normally.
        self._restore()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    # ------------------------------------------------------------------ step boundaries

    def _save_if_signalled(self, trainer: pl.Trainer) -> None:
        received = self.received is not None
        if trainer.world_size > 1:
            # Any rank that was signalled stops every rank (a scheduler may signal only some processes).
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received or self._stop:
            return
        signum = self.received or signal.SIGTERM
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, AtomicCheckpoint):
            path = checkpoint.save_resumable(trainer)
        else:
            folder = (
                getattr(checkpoint, "dirpath", None)
                or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
            )
            path = str(save_atomically(trainer, Path(folder) / "last.ckpt"))
        self.saved, self._stop = path, True
        if trainer.is_global_zero:
            sys.stderr.write(f"{signum.name}: saved {path} at global step {trainer.global_step}; stopping\n")
            if signum == _slurm_requeue_signal(trainer) and self.requeue:
                requeue_slurm_job()

    def _exit_if_saved(self, trainer: pl.Trainer, epoch_end: bool = False) -> None:
        if not self._stop:
            return
        finished = 0 < trainer.max_steps <= trainer.global_step or (
            epoch_end
            and trainer.max_epochs is not None
            and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        )
        if not finished:  # a run that completed anyway exits normally in on_train_end
            raise Preempted(128 + int(self.received or signal.SIGTERM))

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._save_if_signalled(trainer)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # A signal during validation stops it at the next batch: a scheduler's grace period is usually
        # shorter than a validation. The training state to save is the same as after a whole validation.
        if trainer.state.fn != "fit" or trainer.sanity_checking or self._stop:
            return
        received = self.received is not None
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        done = loop.batch_progress.current.completed
        # The metrics of a partial validation are not logged as if it had been complete.
        results = getattr(loop, "_results", None)
        if results is not None:
            results.reset()
            results.clear()
        if trainer.is_global_zero:
            sys.stderr.write(
                f"{(self.received or signal.SIGTERM).name}: validation stopped after {done} batches; its metrics "
                f"at global step {trainer.global_step} are not logged\n"
            )
        raise StopIteration  # Lightning's evaluation loop ends here, as if the data had run out

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal during validation saves here, once the validation has stopped (at its next batch).
        if trainer.state.fn == "fit":
            self._save_if_signalled(trainer)

    # The checkpoint is written where ModelCheckpoint writes; the exit waits for the next hook that
    # comes after the step's metrics were logged, so the metrics file has the saved step's row.
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._exit_if_saved(trainer)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._exit_if_saved(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_if_saved(trainer, epoch_end=True)
