"""CPPOModule: GRPO / CPPO / PAPO fine-tuning of a vision-language policy as a LightningModule.

One Lightning training step is one RL step (see ``design.md``):

1. **Rollout** (no grad): ``G`` completions per prompt from the current policy, decoded and scored by
   the reward functions, group-normalised into advantages.
2. **Update** (manual optimization): the rollouts are split into mini-batches (one optimizer step
   each) and micro-batches (gradient accumulation). Each micro-batch is **one forward** over the
   stacked image views: the original image for every row, and the perturbed views only for the rows
   the objective needs (CPPO with advantage gating: rows with ``A > 0``). Logits are computed only
   over completion positions.

The module is usable on its own in any Lightning project: it needs a DataModule that yields
:class:`~cppo_lightning.batch.PromptBatch` (see ``datamodules`` for ours).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cppo_lightning.batch import ORIGINAL, PromptBatch, concat_vision_inputs
from cppo_lightning.metrics import AverageAccuracy, RewardStatistics
from cppo_lightning.models.loading import LoRAConfig, Policy, PolicyConfig, load_policy
from cppo_lightning.models.scoring import completion_logits
from cppo_lightning.objectives import (
    CPPO,
    NonFiniteError,
    Objective,
    ObjectiveInputs,
    ViewOutputs,
    group_advantages,
    perception_token_mask,
    token_entropy,
    token_logprobs,
)
from cppo_lightning.rewards import DEFAULT_REWARDS, resolve_reward_function
from cppo_lightning.rollout import (
    RewardModel,
    Rollout,
    RolloutConfig,
    decode,
    derived_seed,
    generate,
    repeat_rows,
    sampling_mode,
    seeded,
)

log = logging.getLogger(__name__)


def default_optimizer(parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, lr 1e-5, weight decay 0.01 (a LoRA default; the release's full fine-tuning uses 1e-6)."""
    return torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.01)


@dataclass
class UpdateConfig:
    """How one rollout batch becomes optimizer steps.

    Args:
        mini_batch_size: prompts per optimizer step (their ``G`` rollouts each); None: the whole batch,
            one optimizer step per rollout (then ``lp_old = lp.detach()`` and no old-policy forward runs).
        micro_batch_size: rollouts per forward (gradient accumulation inside a mini-batch).
        ppo_epochs: passes over the rollouts.
        gradient_clip_val: max gradient norm (None: no clipping).
        shuffle: shuffle rollouts between mini-batches (seeded).
    """

    mini_batch_size: int | None = None
    micro_batch_size: int = 4
    ppo_epochs: int = 1
    gradient_clip_val: float | None = 1.0
    shuffle: bool = False


@dataclass
class EvaluationConfig:
    """Validation and test: avg@k accuracy.

    Args:
        samples_per_question: ``k`` samples per question.
        temperature: sampling temperature (1.0 in the papers' protocol).
        top_p: nucleus sampling threshold.
        max_new_tokens: completion length limit (None: the rollout's).
        reward: import path of the 0/1 grading function.
    """

    samples_per_question: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    reward: str = "cppo_lightning.rewards.accuracy_reward"

    def __post_init__(self) -> None:
        from cppo_lightning.rollout import sampling_problems

        problems = sampling_problems(
            self.samples_per_question,
            self.temperature,
            self.top_p,
            self.max_new_tokens,
            "samples_per_question",
        )
        if problems:
            raise ValueError("evaluation: " + "; ".join(problems))


@dataclass
class _StepStatistics:
    """Sums of objective metrics over the micro-batches of one step."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    count: int = 0
    grad_norms: list[float] = field(default_factory=list)

    def add(self, metrics: Mapping[str, Tensor]) -> None:
        for key, value in metrics.items():
            self.sums[key] += float(value)
        self.count += 1

    def means(self) -> dict[str, float]:
        means = {key: value / max(self.count, 1) for key, value in self.sums.items()}
        if self.grad_norms:
            means["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        return means


def _as_dataclass(cls, value):
    """A copy of a config dataclass, or one built from a dict."""
    if isinstance(value, cls):
        return copy.deepcopy(value)
    if isinstance(value, Mapping):
        value = dict(value)
        if cls is PolicyConfig and isinstance(value.get("lora"), Mapping):
            value["lora"] = LoRAConfig(**value["lora"])
        return cls(**value)
    raise TypeError(f"expected a {cls.__name__} or a dict, got {type(value).__name__}")


def _as_objective(value) -> Objective:
    if value is None:
        return CPPO()
    if isinstance(value, Objective):
        return value
    if isinstance(value, Mapping):
        return Objective.from_config(value)
    raise TypeError(
        f"objective must be an Objective (GRPO, CPPO, PAPO) or its config, got {type(value).__name__}"
    )


class CPPOModule(pl.LightningModule):
    """RL fine-tuning of a VLM with GRPO, CPPO or PAPO.

    Args:
        policy: the checkpoint and how to fine-tune it (LoRA, QLoRA, full).
        objective: ``GRPO``, ``CPPO`` (default) or ``PAPO`` from :mod:`cppo_lightning.objectives`.
        rollout: sampling settings (``G``, temperature, top-p, max new tokens).
        update: mini-/micro-batches, PPO epochs, gradient clipping.
        evaluation: validation/test sampling (avg@k).
        reward_functions: import path (or, from Python, a callable) -> weight. Default: the release's
            ``0.9 * accuracy + 0.1 * format``.
        optimizer: a callable ``parameters -> Optimizer`` (``class_path: torch.optim.AdamW`` in YAML).
        scheduler: optional callable ``optimizer -> LRScheduler``, stepped once per optimizer step.
        seed: base seed of rollout sampling (combined with the rank and the step).
        allow_base_mismatch: load a checkpoint trained on another base model (or fine-tuning mode) with a
            warning instead of an error (see :mod:`cppo_lightning.checkpoint_base`).
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        objective: Objective | None = None,
        rollout: RolloutConfig = RolloutConfig(),
        update: UpdateConfig = UpdateConfig(),
        evaluation: EvaluationConfig = EvaluationConfig(),
        reward_functions: dict[str, float] | None = None,
        optimizer: Callable[[Iterable], torch.optim.Optimizer] = default_optimizer,
        scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
        seed: int = 0,
        allow_base_mismatch: bool = False,
    ) -> None:
        super().__init__()
        self.allow_base_mismatch = allow_base_mismatch
        # Configs arrive as dataclasses (Python, CLI) or as plain dicts (load_from_checkpoint).
        self.policy_config = _as_dataclass(PolicyConfig, policy)
        self.objective = _as_objective(objective)
        self.rollout_config = _as_dataclass(RolloutConfig, rollout)
        self.update_config = _as_dataclass(UpdateConfig, update)
        self.evaluation = _as_dataclass(EvaluationConfig, evaluation)
        self.reward_model = RewardModel(reward_functions or DEFAULT_REWARDS)
        self.eval_grader = resolve_reward_function(self.evaluation.reward)[1]
        # Plain data only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "policy": dataclasses.asdict(self.policy_config),
                "objective": self.objective.config(),
                "rollout": dataclasses.asdict(self.rollout_config),
                "update": dataclasses.asdict(self.update_config),
                "evaluation": dataclasses.asdict(self.evaluation),
                "reward_functions": self.reward_model.specification(),
                "seed": seed,
            }
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        self.automatic_optimization = False
        # Under LoRA only the adapters are checkpointed; the frozen base is reloaded from its source.
        self.strict_loading = False
        self.policy: Policy | None = None
        self.reward_statistics = RewardStatistics()
        self.eval_accuracy = torch.nn.ModuleDict()
        self.skipped_steps = 0
        self.last_rollout: Rollout | None = None
        self.last_eval_rollout: Rollout | None = None
        # Counts reference forwards (a test checks that beta = 0 runs none).
        self.reference_forwards = 0
        self._validate_sizes()

    # ------------------------------------------------------------------ set-up

    def _validate_sizes(self, prompts_per_batch: int | None = None) -> None:
        rollout, update = self.rollout_config, self.update_config
        problems = []
        if rollout.samples_per_prompt < 2:
            problems.append(
                f"samples_per_prompt (G) is {rollout.samples_per_prompt}: group-normalised advantages need G >= 2"
            )
        if update.micro_batch_size < 1 or update.ppo_epochs < 1:
            problems.append(
                f"micro_batch_size ({update.micro_batch_size}) and ppo_epochs ({update.ppo_epochs}) must be >= 1"
            )
        mini = update.mini_batch_size or prompts_per_batch
        if mini is not None:
            if prompts_per_batch is not None and prompts_per_batch % mini:
                problems.append(
                    f"mini_batch_size ({mini} prompts) does not divide the batch ({prompts_per_batch} prompts)"
                )
            rows = mini * rollout.samples_per_prompt
            if rows % update.micro_batch_size:
                problems.append(
                    f"micro_batch_size ({update.micro_batch_size} rollouts) does not divide a mini-batch of "
                    f"{mini} prompts x G={rollout.samples_per_prompt} = {rows} rollouts"
                )
        if problems:
            raise ValueError("batch sizes do not fit: " + "; ".join(problems))

    @property
    def required_views(self) -> tuple[str, ...]:
        """Image views a batch must carry for this objective (DataModules may read this)."""
        return (ORIGINAL, *(request.name for request in self.objective.view_requests()))

    @override
    def configure_model(self) -> None:
        """Load the policy (idempotent; Lightning calls it before optimizers and checkpoint restore)."""
        if self.policy is not None:
            return
        device_map = None
        if self.policy_config.finetuning == "qlora" and self._trainer is not None:
            device = self.trainer.strategy.root_device
            if device.type == "cuda":
                # bitsandbytes quantizes while loading: put each rank's copy on its own GPU directly.
                device_map = {"": device}
        # Seeded: LoRA's random initialisation must not depend on what ran before in the process.
        with seeded(derived_seed(self.seed, "init")):
            self.policy = load_policy(
                self.policy_config, reference=self.objective.needs_reference, device_map=device_map
            )

    @override
    def setup(self, stage: str) -> None:
        self.configure_model()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        batch_size = getattr(datamodule, "batch_size", None)
        if stage == "fit" and isinstance(batch_size, int):
            self._validate_sizes(batch_size)

    @override
    def configure_optimizers(self):
        self.configure_model()
        optimizer = self.optimizer_factory(self.policy.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    # ------------------------------------------------------------------ helpers

    @property
    def tokenizer(self):
        """The policy's tokenizer."""
        return self.policy.processor.tokenizer

    def _eos_and_pad(self) -> tuple[list[int], int]:
        config = self.policy.unwrapped().generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else self.tokenizer.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad = config.pad_token_id if config.pad_token_id is not None else self.tokenizer.pad_token_id
        return eos, pad

    def _synced_generation(self) -> bool:
        # Sharded strategies gather weights layer by layer: every rank must run the same number of
        # decoding steps, or the ranks that finished early deadlock the others.
        if self._trainer is None or self.trainer.world_size == 1:
            return False
        name = type(self.trainer.strategy).__name__
        return name.startswith(("FSDP", "DeepSpeed", "ModelParallel"))

    def _sample(
        self, batch: PromptBatch, samples: int, config: RolloutConfig
    ) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        example_rows = repeat_rows(batch, samples, self.device)
        eos, pad = self._eos_and_pad()
        with sampling_mode(self.policy.model):
            completion, mask = generate(
                self.policy.model,
                batch.model_inputs(ORIGINAL, example_rows),
                config,
                eos,
                pad,
                synced_gpus=self._synced_generation(),
            )
        return example_rows, completion, mask, decode(self.tokenizer, completion, mask)

    def _stacked_inputs(
        self, batch: PromptBatch, rollout: Rollout, parts: list[tuple[str, Tensor]], length: int
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Model inputs, completions and masks for several (view, rollout rows) parts, stacked on dim 0."""
        parts = [(view, rows) for view, rows in parts if len(rows)]  # e.g. no row with A > 0 this time
        inputs = concat_vision_inputs(
            [batch.model_inputs(view, rollout.example_rows[rows]) for view, rows in parts]
        )
        completion = torch.cat([rollout.completion_ids[rows, :length] for _, rows in parts])
        mask = torch.cat([rollout.completion_mask[rows, :length] for _, rows in parts])
        return inputs, completion, mask

    def _score_no_grad(self, batch: PromptBatch, rollout: Rollout, view: str) -> Tensor:
        """[N, C] log-probs of every rollout under one view with the current (pre-update) policy."""
        scores = []
        micro = self.update_config.micro_batch_size
        with torch.no_grad():
            for start in range(0, len(rollout), micro):
                rows = torch.arange(start, min(start + micro, len(rollout)), device=self.device)
                inputs, completion, mask = self._stacked_inputs(
                    batch, rollout, [(view, rows)], rollout.completion_ids.shape[1]
                )
                logits = completion_logits(self.policy.model, inputs, completion, mask)
                scores.append(token_logprobs(logits, completion, temperature=self.rollout_config.temperature))
        return torch.cat(scores)

    # ------------------------------------------------------------------ training

    def rollout(self, batch: PromptBatch) -> Rollout:
        """Sample ``G`` completions per prompt and score them (no gradient)."""
        group = self.rollout_config.samples_per_prompt
        example_rows, completion, mask, texts = self._sample(batch, group, self.rollout_config)
        rewards, terms = self.reward_model(batch, example_rows, texts)
        rewards = rewards.to(self.device)
        advantages = group_advantages(rewards, group, scale=self.objective.advantage_scale)
        return Rollout(
            example_rows=example_rows,
            completion_ids=completion,
            completion_mask=mask,
            completions=texts,
            rewards=rewards,
            reward_terms={name: values.to(self.device) for name, values in terms.items()},
            advantages=advantages,
            group_size=group,
            batch=batch,
        )

    @override
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        missing = [view for view in self.required_views if view not in batch.views]
        if missing:
            raise ValueError(
                f"{type(self.objective).__name__} needs image views {list(self.required_views)}; the batch has "
                f"{list(batch.views)} (missing {missing}). Ask the DataModule for them (views: auto)."
            )
        self._validate_sizes(len(batch))
        step_seed = derived_seed(self.seed, self.global_rank, self.global_step, "train")
        with seeded(step_seed, self.device):
            started = time.perf_counter()
            rollout = self.rollout(batch)
            rolled = time.perf_counter()
            statistics = self.update(batch, rollout)
            finished = time.perf_counter()
        self.last_rollout = rollout
        self._log_training(rollout, statistics, rolled - started, finished - rolled)

    def update(self, batch: PromptBatch, rollout: Rollout) -> _StepStatistics:
        """Optimizer steps on one rollout batch (mini-batches x micro-batches x PPO epochs)."""
        update, group = self.update_config, rollout.group_size
        mini_rows = (update.mini_batch_size or len(batch)) * group
        micro = update.micro_batch_size
        optimizer_steps = update.ppo_epochs * (len(rollout) // mini_rows)
        # One optimizer step per rollout: the policy that sampled is the one being updated, so
        # lp_old == lp.detach() and no separate old-policy forward is needed.
        old_logprobs = self._score_no_grad(batch, rollout, ORIGINAL) if optimizer_steps > 1 else None
        # Views the objective wants from the pre-update policy without gradient (PAPO's masked view).
        frozen_views = {
            request.name: self._score_no_grad(batch, rollout, request.name)
            for request in self.objective.view_requests()
            if not request.with_grad
        }
        self._init_rollout_buffers(rollout)
        scheduler = self.lr_schedulers()
        statistics = _StepStatistics()
        for epoch in range(update.ppo_epochs):
            order = torch.arange(len(rollout), device=self.device)
            if update.shuffle:
                order = order[torch.randperm(len(rollout), device="cpu").to(self.device)]
            for start in range(0, len(rollout), mini_rows):
                mini = order[start : start + mini_rows]
                self._optimizer_step(
                    batch, rollout, mini, micro, old_logprobs, frozen_views, statistics, epoch == 0
                )
                if scheduler is not None:
                    scheduler.step()
        return statistics

    def _optimizer_step(
        self,
        batch: PromptBatch,
        rollout: Rollout,
        rows: Tensor,
        micro: int,
        old_logprobs: Tensor | None,
        frozen_views: dict[str, Tensor],
        statistics: _StepStatistics,
        record: bool,
    ) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        chunks = list(torch.split(rows, micro))
        finite = True
        for index, chunk in enumerate(chunks):
            try:
                loss, metrics = self._micro_batch_loss(
                    batch, rollout, chunk, old_logprobs, frozen_views, record
                )
                ok = bool(torch.isfinite(loss))
                problem = "loss is not finite"
            except NonFiniteError as error:
                loss, metrics, ok, problem = None, {}, False, str(error)
            # Every rank takes the same decision, or DDP would wait forever for a skipped backward.
            if not self.trainer.strategy.reduce_boolean_decision(ok, all=True):
                finite = False
                log.warning(
                    "step %d: skipping an optimizer step (%s)",
                    self.global_step,
                    problem if not ok else "on another rank",
                )
                break
            last = index == len(chunks) - 1
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            blocking = getattr(self.trainer.strategy, "block_backward_sync", None)
            with blocking() if blocking is not None and not last else nullcontext():
                self.manual_backward(loss / len(chunks))
            statistics.add(metrics)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return
        gradients = [p.grad for p in self.policy.trainable_parameters() if p.grad is not None]
        if gradients:
            statistics.grad_norms.append(
                float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in gradients])))
            )
        if self.update_config.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.update_config.gradient_clip_val,
                gradient_clip_algorithm="norm",
            )
        optimizer.step()

    def _micro_batch_loss(
        self,
        batch: PromptBatch,
        rollout: Rollout,
        rows: Tensor,
        old_logprobs: Tensor | None,
        frozen_views: dict[str, Tensor],
        record: bool,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        objective = self.objective
        temperature = self.rollout_config.temperature
        advantages = rollout.advantages[rows]
        # Trim the padding columns no row of this micro-batch uses.
        length = int(rollout.completion_mask[rows].any(dim=0).nonzero().max()) + 1
        requests = [request for request in objective.view_requests() if request.with_grad]
        view_rows = objective.view_rows(advantages).nonzero()[:, 0] if requests else None
        parts = [(ORIGINAL, rows)] + [(request.name, rows[view_rows]) for request in requests]
        inputs, completion, mask = self._stacked_inputs(batch, rollout, parts, length)
        # One forward over every view: DDP/FSDP see a single forward per backward.
        logits = completion_logits(self.policy.model, inputs, completion, mask)
        logprobs = token_logprobs(logits, completion, temperature=temperature)
        sizes = [len(part_rows) for _, part_rows in parts]
        logits_parts = torch.split(logits, sizes)
        logprob_parts = torch.split(logprobs, sizes)
        response_mask = rollout.completion_mask[rows, :length]
        entropy = token_entropy(logits_parts[0], temperature=temperature) if objective.needs_entropy else None
        distribution = (
            torch.log_softmax(logits_parts[0].float() / temperature, dim=-1)
            if objective.needs_full_distribution
            else None
        )
        views = {}
        for request, view_logits, view_logprobs in zip(requests, logits_parts[1:], logprob_parts[1:]):
            views[request.name] = ViewOutputs(
                rows=view_rows,
                logprobs=view_logprobs,
                entropy=token_entropy(view_logits, temperature=temperature) if request.entropy else None,
                log_distribution=(
                    torch.log_softmax(view_logits.float() / temperature, dim=-1)
                    if request.full_distribution
                    else None
                ),
            )
        for name, scores in frozen_views.items():
            views[name] = ViewOutputs(
                rows=torch.arange(len(rows), device=self.device), logprobs=scores[rows, :length]
            )
        reference = None
        if objective.needs_reference:
            self.reference_forwards += 1
            with torch.no_grad(), self.policy.reference() as model:
                ref_inputs, ref_completion, ref_mask = self._stacked_inputs(
                    batch, rollout, [(ORIGINAL, rows)], length
                )
                reference = token_logprobs(
                    completion_logits(model, ref_inputs, ref_completion, ref_mask),
                    ref_completion,
                    temperature=temperature,
                )
        objective_inputs = ObjectiveInputs(
            logprobs=logprob_parts[0],
            response_mask=response_mask,
            advantages=advantages,
            old_logprobs=old_logprobs[rows, :length] if old_logprobs is not None else None,
            ref_logprobs=reference,
            entropy=entropy,
            log_distribution=distribution,
            views=views,
        )
        loss, metrics = objective(objective_inputs)
        if record:
            self._record_entropies(rollout, rows, length, entropy, views)
        return loss, metrics

    # ------------------------------------------------------------------ what callbacks read

    def _init_rollout_buffers(self, rollout: Rollout) -> None:
        if self.objective.needs_entropy:
            shape = rollout.completion_ids.shape
            rollout.entropy = torch.full(shape, float("nan"), device=self.device)
            rollout.entropy_removed = torch.full(shape, float("nan"), device=self.device)

    def _record_entropies(
        self, rollout: Rollout, rows: Tensor, length: int, entropy: Tensor | None, views: dict
    ) -> None:
        if entropy is None or rollout.entropy is None:
            return
        rollout.entropy[rows, :length] = entropy.detach().float()
        removing = views.get("removing")
        if removing is not None and removing.entropy is not None:
            rollout.entropy_removed[rows[removing.rows], :length] = removing.entropy.detach().float()

    def _finish_rollout_record(self, rollout: Rollout) -> None:
        """Perception mask of the whole rollout, from the entropies the update computed."""
        objective = self.objective
        if rollout.entropy is None or not getattr(objective, "perception_mask", False):
            return
        # Rows without an I- forward: no entropy rise, nothing selected (as in the objective).
        removed = torch.where(torch.isnan(rollout.entropy_removed), rollout.entropy, rollout.entropy_removed)
        entropy = torch.nan_to_num(rollout.entropy)
        rollout.perception_mask = perception_token_mask(
            entropy,
            torch.nan_to_num(removed),
            rollout.completion_mask,
            top_ratio=objective.top_ratio,
            advantages=rollout.advantages if objective.advantage_gating else None,
        )

    # ------------------------------------------------------------------ logging

    def _log_training(
        self, rollout: Rollout, statistics: _StepStatistics, rollout_time: float, update_time: float
    ) -> None:
        self._finish_rollout_record(rollout)
        self.reward_statistics.update(rollout.rewards, rollout.group_size)
        values = dict(self.reward_statistics.compute())
        self.reward_statistics.reset()
        for name, term in rollout.reward_terms.items():
            values[f"reward/{name}"] = term.float().mean()
        if "accuracy" in rollout.reward_terms:
            values["accuracy"] = rollout.reward_terms["accuracy"].float().mean()
        if "format" in rollout.reward_terms:
            values["format_rate"] = rollout.reward_terms["format"].float().mean()
        lengths = rollout.completion_mask.sum(dim=1).float()
        values["response_length"] = lengths.mean()
        values["response_length_max"] = lengths.max()
        values.update(statistics.means())
        values["skipped_steps"] = float(self.skipped_steps)
        values["lr"] = self.optimizers().param_groups[0]["lr"]
        timing = {
            "time/rollout_s": rollout_time,
            "time/update_s": update_time,
            "throughput/generated_tokens_per_s": float(lengths.sum()) / max(rollout_time, 1e-9),
            "throughput/update_rollouts_per_s": len(rollout) / max(update_time, 1e-9),
        }
        self.log_dict(
            {
                f"train/{key}": torch.as_tensor(value, dtype=torch.float32, device=self.device)
                for key, value in values.items()
            },
            on_step=True,
            on_epoch=False,
            sync_dist=True,
            batch_size=len(rollout),
        )
        self.log_dict(timing, on_step=True, on_epoch=False, batch_size=len(rollout))

    # ------------------------------------------------------------------ evaluation

    def _evaluation_step(self, stage: str, batch: PromptBatch, batch_idx: int, dataloader_idx: int) -> None:
        evaluation = self.evaluation
        k = evaluation.samples_per_question
        config = RolloutConfig(
            samples_per_prompt=k,
            temperature=evaluation.temperature,
            top_p=evaluation.top_p,
            max_new_tokens=evaluation.max_new_tokens or self.rollout_config.max_new_tokens,
        )
        with seeded(derived_seed(self.seed, self.global_rank, stage, dataloader_idx, batch_idx), self.device):
            example_rows, completion, mask, texts = self._sample(batch, k, config)
        rows = example_rows.tolist()
        grades = self.eval_grader(
            [batch.questions[i] if batch.questions else "" for i in rows],
            texts,
            answers=[batch.answers[i] for i in rows],
        )
        correct = torch.as_tensor(grades, dtype=torch.float32, device=self.device).view(len(batch), k)
        key = f"{stage}_{dataloader_idx}"
        if key not in self.eval_accuracy:
            self.eval_accuracy[key] = AverageAccuracy().to(self.device)
        metric = self.eval_accuracy[key]
        metric.update(correct)
        self.log(f"{stage}/avg@{k}", metric, on_step=False, on_epoch=True, batch_size=len(batch))
        self.last_eval_rollout = Rollout(
            example_rows=example_rows,
            completion_ids=completion,
            completion_mask=mask,
            completions=texts,
            rewards=correct.flatten(),
            reward_terms={"accuracy": correct.flatten()},
            advantages=torch.zeros_like(correct.flatten()),
            group_size=k,
            batch=batch,
        )

    @override
    def validation_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("val", batch, batch_idx, dataloader_idx)

    @override
    def test_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("test", batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------------ checkpoints and export

    def _checkpointed_keys(self) -> set[str]:
        if self.policy.uses_adapters:
            return {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        return {name for name in self.state_dict() if not name.startswith("policy.reference_model.")}

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen base (LoRA/QLoRA) and the reference copy (full) are reloaded from the source
        # checkpoint, so a Lightning checkpoint holds only what training changed.
        keep = self._checkpointed_keys()
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if key in keep
        }
        if self._base_record is None:  # the base does not change during a run: hashed once
            self._base_record = self._current_base()
        checkpoint["cppo"] = {
            "skipped_steps": self.skipped_steps,
            "model_name_or_path": self.policy_config.model_name_or_path,
            "base": self._base_record,
        }

    _base_record: dict | None = None

    def _current_base(self) -> dict:
        from cppo_lightning.checkpoint_base import base_record

        config = self.policy_config
        return base_record(config.model_name_or_path, config.finetuning, config.revision)

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from cppo_lightning.checkpoint_base import check_base

        # Before the key check: adapters of another base have exactly the keys this policy expects.
        check_base(checkpoint.get("cppo", {}).get("base"), self._current_base(), self.allow_base_mismatch)
        self.configure_model()
        missing = sorted(self._checkpointed_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} trained tensors of this policy (e.g. {missing[:3]}): it was "
                "written for a different model or fine-tuning mode"
            )
        self.skipped_steps = checkpoint.get("cppo", {}).get("skipped_steps", 0)

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the LoRA adapter in PEFT format, with the processor, to ``folder``.

        Raises:
            ValueError: the policy has no adapters (full fine-tuning: use :meth:`save_pretrained`).
        """
        if not self.policy.uses_adapters:
            raise ValueError("full fine-tuning has no adapter; use save_pretrained()")
        folder = Path(folder)
        self.policy.model.save_pretrained(folder)
        self.policy.processor.save_pretrained(folder)
        return folder

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a plain ``transformers`` checkpoint: LoRA merged into the base (or the full model).

        Under QLoRA the base is reloaded unquantized so that the merged weights are exact.
        """
        from cppo_lightning.export import merge_adapter

        folder = Path(folder)
        if self.policy.uses_adapters:
            return merge_adapter(self.policy, folder)
        self.policy.model.save_pretrained(folder)
        self.policy.processor.save_pretrained(folder)
        return folder


__all__ = ["CPPOModule", "EvaluationConfig", "RolloutConfig", "UpdateConfig", "default_optimizer"]
