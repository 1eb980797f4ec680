"""The pool audit of a training config (``cppo audit``): its policy, data and pools, before any training.

The config is parsed as for ``fit``; the audited views are drawn by the data module's own pools
(:mod:`datamodules.pool_audit`), measured by :class:`~cppo_lightning.audit.PoolAudit` built from the
config's module, and written by :func:`~cppo_lightning.audit.report.write_audit_report`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from cppo_lightning.audit import PoolAudit
from cppo_lightning.audit.report import write_audit_report
from cppo_lightning.module import CPPOModule
from datamodules.pool_audit import audit_batches, audit_dataset, load_candidates
from recipes.lightning_cli import build_cli

__all__ = ["audit"]


def audit(
    args: list[str],
    output: str | Path | None = None,
    *,
    examples: int = 256,
    batch_size: int | None = None,
    split: str = "train",
    candidates: str | Path | None = None,
    group_by: str | None = "family",
    device: str | None = None,
    **measure,
):
    """Audit the perturbation pools of a training config before training (``cppo audit``).

    For the config's policy, data and pools: each transform of each pool on its own, the candidates and
    the flat-grey floor are scored on ``examples`` questions (accuracy as sampled avg@k; k3 and exact KL to
    the original on the completions sampled under it; entropy shifts; the CPL direction of every pair and
    of the pools as configured), given a verdict (:class:`cppo_lightning.audit.VerdictRule`), and written
    to ``output`` as ``audit.md``, ``audit.json`` and ``audit.html``.

    Args:
        args: LightningCLI arguments, as for ``fit`` (``["--config", "configs/demo/cppo.yaml", ...]``).
        output: report folder (default ``runs/audit/<config name>``).
        examples: questions audited (the first ones of the split).
        batch_size: prompts per batch (default: the data module's).
        split: ``train`` (where the pools act), ``val`` or ``test``.
        candidates: YAML file of candidate transforms (``preserving:`` / ``removing:`` lists).
        group_by: metadata column grouping the questions (None: none).
        device: ``cpu``, ``cuda`` ... (default: CUDA when available).
        measure: how the views are measured, as for :meth:`~cppo_lightning.audit.PoolAudit.from_module`:
            ``samples`` (completions per question and view; default: the rollout's ``G``), ``rule`` (a
            :class:`~cppo_lightning.audit.VerdictRule`; default thresholds when None), ``view_accuracy``
            (False: sample and grade under ``I`` only, verdicts from the divergences alone),
            ``max_generate_rows`` (rows per ``generate`` call; None: all views of a batch at once).

    Returns:
        ``(AuditResult, {"markdown", "json", "html"} -> path)``.
    """
    started, started_cpu = time.perf_counter(), time.process_time()
    extra = candidates and load_candidates(candidates)
    cli = build_cli(
        CPPOModule,
        [*args, "--trainer.logger", "false", "--trainer.callbacks", "[]"],
        run=False,
        save_config=False,
    )
    module, data = cli.model, cli.datamodule
    configs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--config"]
    name = Path(configs[-1]).stem if configs else "audit"
    output = Path(output) if output is not None else Path("runs") / "audit" / name
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset, maker = audit_dataset(data, extra or None, split)
    runner = PoolAudit.from_module(module, maker.views, device=target, group_key=group_by, **measure)
    tokenizer = runner.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_batch = batch_size or data.batch_size
    total = -(-min(examples, len(dataset)) // per_batch)
    for index, batch in enumerate(audit_batches(dataset, examples, per_batch, pad_id), start=1):
        runner.add(batch)
        # A line per batch: on a CPU the audit of the demo takes minutes.
        print(
            f"audit: batch {index}/{total} ({len(batch)} questions) at {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    result = runner.result(
        {
            "config": " ".join(configs),
            "model": module.policy_config.model_name_or_path,
            "split": split,
            "grader": module.evaluation.reward,
            "objective": type(module.objective).__name__,
            "candidates": str(candidates) if candidates else None,
            "device": str(target),
            "seconds": round(time.perf_counter() - started, 1),
            # CPU time of this process (all its threads): on a shared machine, what the audit itself costs.
            "cpu_seconds": round(time.process_time() - started_cpu, 1),
        }
    )
    return result, write_audit_report(result, output, maker.configs)
