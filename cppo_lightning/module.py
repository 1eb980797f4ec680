"""CPPOModule: GRPO / CPPO / PAPO fine-tuning of a vision-language policy as a LightningModule.

One Lightning training step is one RL step (the README's *What you get* and *The update*):

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
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cppo_lightning.batch import ORIGINAL, PromptBatch
from cppo_lightning.engines import RolloutEngine, build_engine, check_sampler_logprobs
from cppo_lightning.metrics import AverageAccuracy, RewardStatistics
from cppo_lightning.models.grouped import enable_grouped_attention
from cppo_lightning.models.loading import Policy, PolicyConfig, load_policy_on
from cppo_lightning.objectives import CPPO, Objective, group_advantages
from cppo_lightning.rewards import DEFAULT_REWARDS, RewardFunctions, resolve_reward_function, reward_inputs
from cppo_lightning.rollout import Rollout, decode, repeat_rows
from cppo_lightning.sampling import EvaluationConfig, RolloutConfig
from cppo_lightning.seeding import derived_seed, seeded
from cppo_lightning.sharding import (
    check_strategy,
    is_model_parallel,
    is_sharded,
    shard_network,
)
from cppo_lightning.update import Collective, PolicyUpdate, StepStatistics, UpdateConfig

log = logging.getLogger(__name__)


def default_optimizer(parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, lr 1e-5, weight decay 0.01 (a LoRA default; the release's full fine-tuning uses 1e-6)."""
    return torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.01)


def _as_dataclass(cls, value):
    """A copy of a config dataclass, or one built from a dict."""
    if isinstance(value, cls):
        return copy.deepcopy(value)
    if isinstance(value, Mapping):
        return cls(**dict(value))  # nested configs (PolicyConfig.lora) convert themselves
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
        self.rewards = RewardFunctions(reward_functions or DEFAULT_REWARDS)
        self.eval_grader = resolve_reward_function(self.evaluation.reward)[1]
        # Plain data only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "policy": dataclasses.asdict(self.policy_config),
                "objective": self.objective.config(),
                "rollout": dataclasses.asdict(self.rollout_config),
                "update": dataclasses.asdict(self.update_config),
                "evaluation": dataclasses.asdict(self.evaluation),
                "reward_functions": self.rewards.specification(),
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
        self.engine: RolloutEngine | None = None
        self.reward_statistics = RewardStatistics()
        self.eval_accuracy = torch.nn.ModuleDict()
        self.skipped_steps = 0
        self.last_rollout: Rollout | None = None
        self.last_eval_rollout: Rollout | None = None
        # Counts reference and old-policy passes (tests check when none runs).
        self.reference_forwards = 0
        self.old_policy_forwards = 0
        #: Seconds of each phase of the last RL step (see :meth:`phase`).
        self.phase_seconds: dict[str, float] = {}
        self._validated_batch_size: int | None = None
        self._validate_sizes()
        if self.update_config.old_logprobs == "sampler" and self.objective.rollout_correction != "none":
            raise ValueError(
                "model.update.old_logprobs: sampler takes the sampler's log-probs as lp_old, so the weights "
                f"of model.objective.init_args.rollout_correction: {self.objective.rollout_correction} "
                "(pi_old / pi_sampler) would all be 1 and correct nothing: set one of them to "
                "policy / none"
            )

    @property
    def reward_model(self) -> RewardFunctions:
        """Deprecated name of :attr:`rewards` (the weighted reward functions; not a network)."""
        warnings.warn("CPPOModule.reward_model is now CPPOModule.rewards", DeprecationWarning, stacklevel=2)
        return self.rewards

    # ------------------------------------------------------------------ set-up

    def _validate_sizes(self, prompts_per_batch: int | None = None) -> None:
        rollout, update = self.rollout_config, self.update_config
        problems = []
        if rollout.samples_per_prompt < 2:
            problems.append(
                f"samples_per_prompt (G) is {rollout.samples_per_prompt}: group-normalised advantages need G >= 2"
            )
        mini = update.mini_batch_prompts
        if mini is not None and prompts_per_batch is not None and prompts_per_batch % mini:
            problems.append(
                f"mini_batch_prompts ({mini}) does not divide the batch ({prompts_per_batch} prompts)"
            )
        if problems:
            raise ValueError("batch sizes do not fit: " + "; ".join(problems))

    @property
    def sampler_logprob_settings(self) -> list[str]:
        """The settings that make the update read the sampler's log-probs (empty: none does)."""
        settings = []
        if self.update_config.old_logprobs == "sampler":
            settings.append("model.update.old_logprobs: sampler")
        if self.objective.rollout_correction != "none":
            settings.append(
                f"model.objective.init_args.rollout_correction: {self.objective.rollout_correction}"
            )
        return settings

    @property
    def required_views(self) -> tuple[str, ...]:
        """Image views a batch must carry for this objective (DataModules may read this)."""
        return (ORIGINAL, *(request.name for request in self.objective.view_requests()))

    @override
    def configure_model(self) -> None:
        """Load the policy (idempotent; Lightning calls it before optimizers and checkpoint restore)."""
        if self.policy is not None:
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        if strategy is not None:  # before anything is loaded: a refused combination fails at once
            check_strategy(strategy, self.policy_config.finetuning)
        # Only a QLoRA policy is placed by its load (bitsandbytes); Lightning's strategy moves any other.
        qlora = strategy is not None and self.policy_config.finetuning == "qlora"
        device = strategy.root_device if qlora else None
        # Seeded: LoRA's random initialisation must not depend on what ran before in the process.
        with seeded(derived_seed(self.seed, "init")):
            self.policy = load_policy_on(
                self.policy_config, device, reference=self.objective.needs_reference, move=False
            )
        if strategy is not None and is_model_parallel(strategy):
            self._shard(strategy)
        # What samples rollouts (model.rollout.engine); the module only calls generate() and sync().
        self.engine = build_engine(
            self.rollout_config,
            self.policy,
            synced_gpus=self._synced_generation,
            report_logprobs=bool(self.sampler_logprob_settings),
        )
        check_sampler_logprobs(self.engine, self.rollout_config.engine, self.sampler_logprob_settings)
        if self.update_config.shared_prefix:
            # Installed before the first forward, so every step (generation too) runs the same attention
            # code: a resumed run then repeats the uninterrupted one bit for bit.
            for model in (self.policy.model, self.policy.reference_model):
                if model is not None:
                    enable_grouped_attention(model)

    def _shard(self, strategy) -> None:
        """FSDP2 over the data-parallel mesh: the policy, and the frozen reference copy of full fine-tuning."""
        mesh = self.device_mesh["data_parallel"]
        # bf16 compute, fp32 reduction on GPUs; fp32 throughout on the CPU.
        mixed_precision = strategy.root_device.type == "cuda"
        for network in (self.policy.model, self.policy.reference_model):
            if network is not None:
                # fully_shard moves each unit to the mesh's device as it shards it: one unit's whole
                # parameters on the GPU at a time, never the whole network.
                shard_network(network, mesh, mixed_precision)

    @override
    def setup(self, stage: str) -> None:
        self.configure_model()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        batch_size = getattr(datamodule, "batch_size", None)
        if stage == "fit" and isinstance(batch_size, int):
            self._validate_sizes(batch_size)
        self._check_context_length(stage, getattr(datamodule, "longest_prompt", None))

    def _check_context_length(self, stage: str, longest_prompt: tuple[int, str] | None) -> None:
        """Refuse completions that cannot fit the model's positions (with the longest prompt of the data).

        Args:
            stage: ``fit``, ``validate``, ``test`` ...
            longest_prompt: ``(tokens, example id)`` of the data's longest prompt (a data module that
                measured its prompts at set-up says so; None: the completion limit alone is checked).

        Raises:
            ValueError: naming the setting, the prompt and the model's context length.
        """
        from cppo_lightning.models.loading import context_length

        limit = context_length(self.policy.model)
        if limit is None:
            return
        settings = {
            "model.evaluation.max_new_tokens": self.evaluation.max_new_tokens
            or self.rollout_config.max_new_tokens
        }
        if stage == "fit":
            settings = {"model.rollout.max_new_tokens": self.rollout_config.max_new_tokens, **settings}
        prompt, example = longest_prompt if longest_prompt else (0, None)
        for name, tokens in settings.items():
            if tokens + prompt > limit:
                with_prompt = (
                    f" + the longest prompt ({prompt} tokens, example {example!r})" if prompt else ""
                )
                raise ValueError(
                    f"{name} ({tokens}){with_prompt} = {tokens + prompt} tokens exceed the context length of "
                    f"{self.policy_config.model_name_or_path} ({limit} positions): lower {name}"
                    + (" or data.max_prompt_tokens" if prompt else "")
                )

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

    def _synced_generation(self) -> bool:
        # Sharded strategies gather weights layer by layer: every rank must run the same number of
        # decoding steps, or the ranks that finished early deadlock the others.
        if self._trainer is None or self.trainer.world_size == 1:
            return False
        name = type(self.trainer.strategy).__name__
        return name.startswith(("FSDP", "DeepSpeed", "ModelParallel"))

    def _sample(
        self, batch: PromptBatch, samples: int, config: RolloutConfig
    ) -> tuple[Tensor, Tensor, Tensor, list[str], Tensor | None]:
        example_rows = repeat_rows(batch, samples, self.device)
        # Callers seed torch per step and rank (`seeded`); engines with their own sampler derive from it.
        generation = self.engine.generate(self.policy, batch, example_rows, config, torch.initial_seed())
        completion, mask = generation.completion_ids, generation.completion_mask
        texts = decode(self.tokenizer, completion, mask)
        return example_rows, completion, mask, texts, generation.sampler_logprobs

    # ------------------------------------------------------------------ training

    def rollout(self, batch: PromptBatch) -> Rollout:
        """Sample ``G`` completions per prompt and score them (no gradient)."""
        group = self.rollout_config.samples_per_prompt
        example_rows, completion, mask, texts, sampler_logprobs = self._sample(
            batch, group, self.rollout_config
        )
        rewards, terms = self.rewards(batch, example_rows, texts)
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
            sampler_logprobs=sampler_logprobs,
        )

    @override
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        missing = [view for view in self.required_views if view not in batch.views]
        if missing:
            raise ValueError(
                f"{type(self.objective).__name__} needs image views {list(self.required_views)}; the batch has "
                f"{list(batch.views)} (missing {missing}). Ask the DataModule for them (views: null)."
            )
        if self._validated_batch_size != len(batch):
            self._validate_sizes(len(batch))
            self._validated_batch_size = len(batch)
        step_seed = derived_seed(self.seed, self.global_rank, self.global_step, "train")
        self.phase_seconds = {}
        with seeded(step_seed, self.device):
            started = time.perf_counter()
            with self.phase("rollout"):
                rollout = self.rollout(batch)
            rolled = time.perf_counter()
            statistics = self.update(batch, rollout)
            finished = time.perf_counter()
        self.last_rollout = rollout
        self._log_training(rollout, statistics, rolled - started, finished - rolled)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """One phase of the RL step, timed into :attr:`phase_seconds` and logged as ``time/<name>_s``.

        The phases run one after another, never nested: ``rollout`` (sampling and rewards), the update's
        no-grad scoring before any gradient, ``scoring`` (old-policy and frozen-view log-probs, with the
        policy) and ``reference`` (the reference policy's log-probs), and ``gradient`` (forwards,
        backwards and optimizer steps). Subclasses may extend it, e.g. to measure memory per phase
        (``benchmarks/real_scale.py``).
        """
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - started

    def policy_update(self) -> PolicyUpdate:
        """The update loop of one rollout batch (:class:`~cppo_lightning.update.PolicyUpdate`), wired to
        this module's trainer: Lightning's backward and gradient clipping, the strategy's collectives."""
        attached = self._trainer is not None
        collective = Collective.of_strategy(self.trainer.strategy, self.device) if attached else Collective()

        def backward(loss: Tensor, last: bool) -> None:
            if not attached:  # used on its own (tests, notebooks): plain autograd
                loss.backward()
                return
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            blocking = getattr(self.trainer.strategy, "block_backward_sync", None)
            with blocking() if blocking is not None and not last else nullcontext():
                self.manual_backward(loss)

        def clip(optimizer, max_norm: float) -> None:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

        return PolicyUpdate(
            self.policy,
            self.objective,
            self.update_config,
            temperature=self.rollout_config.temperature,
            samples_from_policy=self.engine.samples_from_policy,
            collective=collective,
            backward=backward,
            clip=clip if attached else None,
            phase=self.phase,
            on_step=lambda: self.engine.sync(self.policy),  # the next rollout samples the new weights
        )

    def update(self, batch: PromptBatch, rollout: Rollout) -> StepStatistics:
        """Optimizer steps on one rollout batch (see :class:`~cppo_lightning.update.PolicyUpdate`)."""
        updater = self.policy_update()
        updater.global_step = self.global_step
        statistics = updater.run(batch, rollout, self.optimizers(), self.lr_schedulers())
        self.reference_forwards += updater.reference_passes
        self.old_policy_forwards += updater.old_policy_passes
        self.skipped_steps += statistics.skipped
        rollout.sampler_logprob_mismatch = statistics.sampler.get("sampler_logprob_mismatch")
        return statistics

    # ------------------------------------------------------------------ logging

    def _log_training(
        self, rollout: Rollout, statistics: StepStatistics, rollout_time: float, update_time: float
    ) -> None:
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
        values["forwards"] = float(statistics.forwards)
        values["prompt_tokens_saved"] = statistics.prompt_tokens_saved
        values["skipped_steps"] = float(self.skipped_steps)
        values.update(statistics.sampler)
        values["lr"] = self.optimizers().param_groups[0]["lr"]
        timing = {
            "time/rollout_s": rollout_time,
            "time/update_s": update_time,
            # The update's parts: no-grad scoring with the policy (old policy, frozen views), with the
            # reference policy, and the gradient pass.
            "time/scoring_s": self.phase_seconds.get("scoring", 0.0),
            "time/reference_s": self.phase_seconds.get("reference", 0.0),
            "time/gradient_s": self.phase_seconds.get("gradient", 0.0),
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
        k = self.evaluation.samples_per_question
        config = self.evaluation.sampling(self.rollout_config)
        with seeded(derived_seed(self.seed, self.global_rank, stage, dataloader_idx, batch_idx), self.device):
            example_rows, completion, mask, texts, _ = self._sample(batch, k, config)
        # The dataset's columns too (benchmarks: choices, multiple_choice), as a reward function gets them.
        prompts, columns = reward_inputs(batch, example_rows)
        grades = self.eval_grader(prompts, texts, **columns)
        correct = torch.as_tensor(grades, dtype=torch.float32, device=self.device).view(len(batch), k)
        key = f"{stage}_{dataloader_idx}"
        if key not in self.eval_accuracy:
            self.eval_accuracy[key] = AverageAccuracy().to(self.device)
        metric = self.eval_accuracy[key]
        metric.update(correct)
        # Named explicitly: Lightning caches the module's metric attributes at the first log, so a metric
        # added for a later dataloader (several benchmarks) would not be found.
        self.log(
            f"{stage}/avg@{k}",
            metric,
            on_step=False,
            on_epoch=True,
            batch_size=len(batch),
            metric_attribute=f"eval_accuracy.{key}",
        )
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
        return {name for name in super().state_dict() if not name.startswith("policy.reference_model.")}

    @override
    def state_dict(self, *args, **kwargs):
        """The module's state dict; under FSDP2 only what a checkpoint holds (see :meth:`on_save_checkpoint`).

        Lightning's ``ModelParallelStrategy`` saves and loads with torch distributed checkpoint, which
        loads exactly the keys this returns: the frozen base (LoRA) and the reference copy (full) are not
        written, so they must not be asked for either.
        """
        state = super().state_dict(*args, **kwargs)
        if self.policy is None or not is_sharded(self.policy.model) or args or kwargs:
            return state
        keep = self._checkpointed_keys()
        return type(state)((key, value) for key, value in state.items() if key in keep)

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
        # A sharded checkpoint's tensors were loaded by the strategy, which checked every key.
        missing = sorted(
            self._checkpointed_keys() - set(checkpoint.get("state_dict", self._checkpointed_keys()))
        )
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
        from cppo_lightning.export import save_processor

        folder = Path(folder)
        state = self._gathered_weights()
        if state is None or self.global_rank == 0:
            self.policy.model.save_pretrained(folder, state_dict=state)
            save_processor(self.policy.processor, folder, self.policy_config.model_name_or_path)
        return folder

    def _gathered_weights(self) -> dict[str, Tensor] | None:
        """The whole weights of a sharded policy, on rank 0 (a collective: every rank calls it); None when
        the policy is not sharded (then ``save_pretrained`` reads them itself)."""
        from cppo_lightning.sharding import full_state_dict

        if not is_sharded(self.policy.model):
            return None
        # Under LoRA only the adapters: exports reload the frozen base from where it came from.
        trained = {name for name, p in self.policy.model.named_parameters() if p.requires_grad}
        select = (lambda name: name in trained) if self.policy.uses_adapters else None
        return full_state_dict(self.policy.model, select=select)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a plain ``transformers`` checkpoint: LoRA merged into the base (or the full model).

        Under QLoRA the base is reloaded unquantized so that the merged weights are exact. Under FSDP2 it
        is a collective (call it on every rank): the shards are gathered and rank 0 writes.
        """
        from cppo_lightning.export import merge_adapter, save_processor

        folder = Path(folder)
        state = self._gathered_weights()
        if state is not None and self.global_rank != 0:
            return folder
        if self.policy.uses_adapters:
            return merge_adapter(self.policy, folder, state_dict=state)
        self.policy.model.save_pretrained(folder, state_dict=state)
        save_processor(self.policy.processor, folder, self.policy_config.model_name_or_path)
        return folder


__all__ = ["CPPOModule", "EvaluationConfig", "RolloutConfig", "UpdateConfig", "default_optimizer"]
