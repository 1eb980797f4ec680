"""The measurements: sampling under every view, one stacked forward per micro-batch, sums per group.

:class:`PoolAudit` takes batches of prompts that carry the original image and every audited view, samples
``k`` completions per question under each (:class:`SharedNoiseSampler`: the same random numbers for every
view), grades them, scores the completions sampled under ``I`` under every view with the update's own
scoring path (:class:`~cppo_lightning.update.RolloutScorer`), and sums the figures of
:func:`view_token_sums` and :func:`pair_token_sums` per group of questions; :meth:`PoolAudit.result` turns
the sums into figures, verdicts and the proposed pools.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.generation import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from cppo_lightning.audit.verdicts import AuditResult, VerdictRule, propose_pools
from cppo_lightning.audit.views import (
    ALL,
    FLOOR,
    GREY,
    NEUTRAL_CPL,
    POOL,
    AuditView,
    PairFigures,
    ViewFigures,
    pair_key,
)
from cppo_lightning.batch import ORIGINAL, PRESERVING, REMOVING, TEXT_KEYS, PromptBatch, concat_vision_inputs
from cppo_lightning.engines.hf import sampling_mode
from cppo_lightning.models.scoring import completion_mask
from cppo_lightning.objectives import (
    CPPO,
    Objective,
    ViewRequest,
    group_advantages,
    k3_kl,
    perception_token_mask,
)
from cppo_lightning.objectives.functional import cpl_direction_indicator
from cppo_lightning.rewards import RewardFunctions, reward_inputs
from cppo_lightning.rollout import Rollout, decode, repeat_rows
from cppo_lightning.sampling import RolloutConfig
from cppo_lightning.seeding import derived_seed
from cppo_lightning.update import RolloutScorer, UpdateConfig

if TYPE_CHECKING:
    from cppo_lightning.module import CPPOModule

__all__ = [
    "PoolAudit",
    "SharedNoiseSampler",
    "generation_token_ids",
    "pair_token_sums",
    "view_token_sums",
]


# ---------------------------------------------------------------------------------------------- token sums


@torch.no_grad()
def view_token_sums(
    logprobs: Tensor,
    logprobs_view: Tensor,
    entropy: Tensor,
    entropy_view: Tensor,
    divergence: Tensor,
    response_mask: Tensor,
    top_ratio: float = 0.5,
) -> dict[str, Tensor]:
    """Per-row sums of what a view does to the policy (summed over rows and batches, then divided).

    Args:
        logprobs (Tensor): [R, T] ``lp^I`` of the sampled tokens.
        logprobs_view (Tensor): [R, T] ``lp^view`` of the same tokens.
        entropy (Tensor): [R, T] ``H(I)``.
        entropy_view (Tensor): [R, T] ``H(view)``.
        divergence (Tensor): [R, T] exact ``KL(pi(.|I) || pi(.|view))``.
        response_mask (Tensor): [R, T] bool.
        top_ratio: CPPO's ``rho`` for the perception tokens this view would select as ``I-``.

    Returns:
        name -> [R] float64 sums over each row's response tokens: ``tokens``, ``k3``, ``kl``,
        ``entropy_shift``, ``positive_shift`` (tokens with ``dH > 0``), ``perception`` (tokens selected),
        ``rise`` (sum of ``max(dH, 0)``), ``rise_perception`` (the same over the selected tokens).
    """
    response = response_mask.bool()
    shift = (entropy_view - entropy).double()
    selected = perception_token_mask(entropy, entropy_view, response, top_ratio=top_ratio)
    rise = shift.clamp(min=0) * response

    def total(values: Tensor) -> Tensor:
        return torch.where(response, values.double(), 0.0).sum(-1)

    return {
        "tokens": response.double().sum(-1),
        "k3": total(k3_kl(logprobs.float(), logprobs_view.float())),
        "kl": total(divergence),
        "entropy_shift": total(shift),
        "positive_shift": ((shift > 0) & response).double().sum(-1),
        "perception": selected.double().sum(-1),
        "rise": rise.sum(-1),
        "rise_perception": (rise * selected).sum(-1),
    }


@torch.no_grad()
def pair_token_sums(
    logprobs: Tensor,
    logprobs_preserving: Tensor,
    logprobs_removing: Tensor,
    entropy: Tensor,
    entropy_removing: Tensor,
    response_mask: Tensor,
    advantages: Tensor | None,
    top_ratio: float = 0.5,
    tau: float = 0.1,
) -> dict[str, Tensor]:
    """Per-row sums of the CPL's direction for one ``(I+, I-)`` pair, over CPPO's perception tokens.

    The perception tokens are selected exactly as CPPO selects them in training (from ``H(I)`` and
    ``H(I-)``, gated by ``A > 0`` when ``advantages`` is given).

    Args:
        logprobs (Tensor): [R, T] ``lp^I``.
        logprobs_preserving (Tensor): [R, T] ``lp^{I+}``.
        logprobs_removing (Tensor): [R, T] ``lp^{I-}``.
        entropy (Tensor): [R, T] ``H(I)``.
        entropy_removing (Tensor): [R, T] ``H(I-)``.
        response_mask (Tensor): [R, T] bool.
        advantages (Tensor, optional): [R]; None: no gating.
        top_ratio: CPPO's ``rho``.
        tau: CPPO's ``tau``.

    Returns:
        name -> [R] float64 sums over each row's perception tokens: ``tokens``, ``direction`` (tokens with
        ``D+ < D-``, ties counted half), ``ties`` (tokens with ``D+ = D-``), ``d_plus``, ``d_minus``, ``cpl``.
    """
    mask = perception_token_mask(
        entropy, entropy_removing, response_mask, top_ratio=top_ratio, advantages=advantages
    )
    d_plus = k3_kl(logprobs.float(), logprobs_preserving.float()).double()
    d_minus = k3_kl(logprobs.float(), logprobs_removing.float()).double()
    cpl = F.softplus((d_plus - d_minus) / tau)

    def total(values: Tensor) -> Tensor:
        return torch.where(mask, values, 0.0).sum(-1)

    return {
        "tokens": mask.double().sum(-1),
        "direction": total(cpl_direction_indicator(d_plus, d_minus)),
        "ties": total((d_plus == d_minus).double()),
        "d_plus": total(d_plus),
        "d_minus": total(d_minus),
        "cpl": total(cpl),
    }


# ---------------------------------------------------------------------------------------------- results


# ---------------------------------------------------------------------------------------------- sampling


class SharedNoiseSampler(LogitsProcessor):
    """Sampling by the Gumbel-max trick with one noise for every copy of a completion.

    ``generate(do_sample=False, logits_processor=[this])`` then draws each next token from
    ``softmax(scores / temperature)`` (after top-k and top-p, as ``generate`` samples), exactly, since the argmax
    of ``log p + Gumbel noise`` is a sample of ``p``. The noise of row ``r`` is that of row ``r % base_rows``:
    copies of the same ``base_rows`` rows stacked under several image views in one call see the same random
    numbers, so a view that leaves the policy unchanged gives exactly the original's completions, and the
    accuracies of two views differ by what the views do, not by sampling noise.

    Args:
        base_rows: rows of one view (``B * k``).
        temperature: sampling temperature.
        top_k: keep the ``top_k`` most likely tokens (0: off).
        top_p: nucleus threshold (1.0: off).
        seed: seed of the noise (the same for every call that must share it).
    """

    def __init__(self, base_rows: int, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        if not temperature > 0:
            raise ValueError(f"the audit samples: temperature must be positive, got {temperature}")
        self.base_rows = base_rows
        self.temperature = temperature
        self.filters = [TopKLogitsWarper(top_k)] if top_k else []
        if top_p < 1.0:
            self.filters.append(TopPLogitsWarper(top_p))
        self.seed = seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.generator is None or self.generator.device != scores.device:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed % 2**63)
        scores = scores.float() / self.temperature
        for warper in self.filters:
            scores = warper(input_ids, scores)
        if scores.shape[0] % self.base_rows:
            raise ValueError(f"{scores.shape[0]} rows are not copies of {self.base_rows} base rows")
        uniform = torch.rand(
            self.base_rows, scores.shape[1], generator=self.generator, device=scores.device
        ).clamp_(min=torch.finfo(torch.float32).tiny)
        gumbel = -torch.log(-torch.log(uniform))
        return scores + gumbel.repeat(scores.shape[0] // self.base_rows, 1)


# ---------------------------------------------------------------------------------------------- the audit


def generation_token_ids(model: nn.Module, tokenizer) -> tuple[list[int], int]:
    """``(eos_token_ids, pad_token_id)`` for ``generate``, from the model's generation config (as in training)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    return eos, pad


class _Sums:
    """Float sums keyed by ``(group, item, name)``."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str], float] = defaultdict(float)

    def add_rows(self, groups: Sequence[str], item: str, sums: Mapping[str, Tensor]) -> None:
        """Add per-row sums ([R] each) to each row's group and to ``"all"``."""
        columns = {name: values.detach().cpu().double().numpy() for name, values in sums.items()}
        for row, group in enumerate(groups):
            for name, values in columns.items():
                value = float(values[row])
                self.values[ALL, item, name] += value
                if group != ALL:
                    self.values[group, item, name] += value

    def get(self, group: str, item: str, name: str) -> float:
        return self.values.get((group, item, name), 0.0)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


class PoolAudit:
    """Runs the audit batch by batch; :meth:`result` gives the figures, verdicts and proposal.

    :meth:`from_module` builds one with the settings of a :class:`~cppo_lightning.module.CPPOModule`.

    Args:
        model: the policy (evaluated in eval mode, without gradient).
        tokenizer: its tokenizer (decodes the completions).
        views: the views every batch carries besides ``"original"`` (their names are vision keys).
        grader: the 0/1 grading function ``(prompts, completions, **columns) -> list[float]``.
        reward_model: the training rewards, for the advantages that gate the perception tokens.
        rollout: sampling settings (temperature, top-p, max new tokens).
        samples: ``k`` completions per question and view (at least 2: advantages are group-normalised).
        eos_token_ids: ids that end a completion.
        pad_token_id: padding id for ``generate``.
        objective: training's objective: its advantage scale, and for CPPO its perception-token selection
            (``rho``, ``tau``, advantage gating); CPPO's defaults select the tokens of a GRPO or PAPO objective
            (None: :class:`~cppo_lightning.objectives.CPPO` with its defaults).
        update: training's update settings: rollouts and tokens per stacked forward, LM-head chunk (None: one
            forward over all rows).
        seed: sampling seed.
        group_key: metadata column that groups the questions (None: no groups).
        rule: the verdict thresholds (None: the defaults).
        keep_examples: examples kept (images and completions) for the report.
        view_accuracy: sample and grade under every view; False samples under ``I`` only (the cheap
            mode for large models: the verdicts then rest on the divergences alone).
        max_generate_rows: rows of one ``generate`` call (the views of a batch are stacked into as few
            calls as this allows; None: all views in one call).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        views: Sequence[AuditView],
        grader: Callable[..., Sequence[float]],
        reward_model: RewardFunctions,
        rollout: RolloutConfig,
        samples: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        objective: Objective | None = None,
        update: UpdateConfig | None = None,
        seed: int = 0,
        group_key: str | None = "family",
        rule: VerdictRule | None = None,
        keep_examples: int = 3,
        view_accuracy: bool = True,
        max_generate_rows: int | None = None,
    ) -> None:
        if samples < 2:
            raise ValueError(f"samples must be >= 2 (advantages are normalised over them), got {samples}")
        names = [view.name for view in views]
        if len(set(names)) != len(names) or ORIGINAL in names:
            raise ValueError(f"audited view names must be unique and not {ORIGINAL!r}: {names}")
        if not any(view.name == GREY and view.role == FLOOR for view in views):
            raise ValueError(f"the audit needs the flat-grey floor view ({GREY!r}, role {FLOOR!r})")
        self.model = model
        self.tokenizer = tokenizer
        self.views = list(views)
        self.grader = grader
        self.reward_model = reward_model
        self.rollout_config = dataclasses.replace(rollout, samples_per_prompt=samples)
        self.samples = samples
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        objective = objective if objective is not None else CPPO()
        selection = objective if isinstance(objective, CPPO) else CPPO()
        self.top_ratio, self.tau = selection.top_ratio, selection.tau
        self.advantage_gating = selection.advantage_gating
        self.advantage_scale = objective.advantage_scale
        self.max_rows = update.micro_batch_rollouts if update else None
        self.max_tokens = update.max_tokens_per_forward if update else None
        self.chunk_tokens = update.logits_chunk_tokens if update else None
        self.seed = seed
        self.group_key = group_key
        self.rule = rule or VerdictRule()
        self.keep_examples = keep_examples
        self.view_accuracy = view_accuracy
        self.max_generate_rows = max_generate_rows
        self.examples: list[dict[str, Any]] = []
        self.batches = 0
        self.questions = 0
        self.forwards = 0
        self.seconds = {"sampling": 0.0, "scoring": 0.0}
        self._accuracy = _Sums()
        self._views = _Sums()
        self._pairs = _Sums()
        self._group_names: list[str] = []

    @classmethod
    def from_module(
        cls,
        module: CPPOModule,
        views: Sequence[AuditView],
        *,
        device: torch.device | str | None = None,
        samples: int | None = None,
        **settings,
    ) -> PoolAudit:
        """The audit of a module's policy with the module's own settings.

        The grader is the module's evaluation grader; the rewards, sampling settings, seed, objective and
        update budgets are training's. The policy is the module's when it is loaded, else loaded onto
        ``device`` without a reference (:func:`~cppo_lightning.models.loading.load_policy_on`); it is put
        in eval mode.

        Args:
            module: a :class:`~cppo_lightning.module.CPPOModule` (configured, e.g. by the LightningCLI).
            views: the views every batch carries besides ``"original"``.
            device: where to load the policy (None: the CPU).
            samples: ``k`` completions per question and view (None: the rollout's ``G``).
            settings: ``group_key``, ``rule``, ``keep_examples``, ``view_accuracy``, ``max_generate_rows``
                (as for :class:`PoolAudit`).
        """
        from cppo_lightning.models.loading import load_policy_on

        policy = module.policy
        if policy is None:
            policy = load_policy_on(module.policy_config, device, reference=False)
        policy.model.eval()
        tokenizer = policy.processor.tokenizer
        eos, pad = generation_token_ids(policy.model, tokenizer)
        rollout = module.rollout_config
        return cls(policy.model, tokenizer, views, module.eval_grader, module.rewards, rollout,
                   samples or rollout.samples_per_prompt, eos, pad, module.objective, module.update_config,
                   module.seed, **settings)  # fmt: skip

    # ---- one batch --------------------------------------------------------------------------

    def _groups(self, batch: PromptBatch) -> list[str]:
        groups = []
        for metadata in batch.metadata or [{} for _ in range(len(batch))]:
            value = metadata.get(self.group_key) if self.group_key else None
            groups.append(ALL if value is None else str(value))
        for group in groups:
            if group != ALL and group not in self._group_names:
                self._group_names.append(group)
        return groups

    def _sample(self, batch: PromptBatch, views: list[str], rows: Tensor) -> dict[str, tuple]:
        """Completions of ``rows`` under each view, the views stacked into as few ``generate`` calls as
        ``max_generate_rows`` allows, every view with the same random numbers (:class:`SharedNoiseSampler`)."""
        per_call = max(1, (self.max_generate_rows or len(rows) * len(views)) // len(rows))
        config = self.rollout_config
        out = {}
        for start in range(0, len(views), per_call):
            chunk = views[start : start + per_call]
            pieces = [batch.model_inputs(view, rows) for view in chunk]
            inputs = {
                key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0] if key in TEXT_KEYS
            }
            inputs.update(
                concat_vision_inputs([{k: v for k, v in p.items() if k not in TEXT_KEYS} for p in pieces])
            )
            sampler = SharedNoiseSampler(
                len(rows),
                config.temperature,
                config.top_k,
                config.top_p,
                derived_seed(self.seed, "audit", self.batches),
            )
            with sampling_mode(self.model):
                sequences = self.model.generate(
                    **inputs,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([sampler]),
                    max_new_tokens=config.max_new_tokens,
                    eos_token_id=self.eos_token_ids,
                    pad_token_id=self.pad_token_id,
                    use_cache=True,
                )
            completion = sequences[:, inputs["input_ids"].shape[1] :]
            mask = completion_mask(completion, self.eos_token_ids)
            for number, view in enumerate(chunk):
                block = slice(number * len(rows), (number + 1) * len(rows))
                ids, view_mask = completion[block], mask[block]
                out[view] = (ids, view_mask, decode(self.tokenizer, ids, view_mask))
        return out

    @torch.no_grad()
    def add(self, batch: PromptBatch) -> None:
        """Sample, grade and score one batch of prompts under every view.

        Args:
            batch: prompts carrying ``"original"`` and every audited view.

        Raises:
            KeyError: the batch lacks an audited view.
        """
        missing = [view.name for view in self.views if view.name not in batch.vision]
        if missing:
            raise KeyError(f"the batch lacks the audited views {missing} (it has {list(batch.vision)})")
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        rows = repeat_rows(batch, self.samples, device)
        groups = self._groups(batch)
        row_groups = [groups[i] for i in rows.tolist()]
        prompts, columns = reward_inputs(batch, rows)
        texts: dict[str, list[str]] = {}
        grades: dict[str, list[float]] = {}
        rollout = None
        sampled = [view.name for view in self.views if view.sampled] if self.view_accuracy else []
        started = time.perf_counter()
        completions = self._sample(batch, [ORIGINAL, *sampled], rows)
        for view, (ids, mask, texts[view]) in completions.items():
            grades[view] = [float(value) for value in self.grader(prompts, texts[view], **columns)]
            self._accuracy.add_rows(
                row_groups,
                view,
                {
                    "correct": torch.tensor(grades[view], dtype=torch.float64),
                    "samples": torch.ones(len(rows), dtype=torch.float64),
                },
            )
            if view == ORIGINAL:
                rewards, terms = self.reward_model(batch, rows, texts[view])
                rewards = rewards.to(device)
                rollout = Rollout(
                    example_rows=rows,
                    completion_ids=ids,
                    completion_mask=mask,
                    completions=texts[view],
                    rewards=rewards,
                    reward_terms={name: values.to(device) for name, values in terms.items()},
                    advantages=group_advantages(rewards, self.samples, scale=self.advantage_scale),
                    group_size=self.samples,
                    batch=batch,
                )
        scoring = time.perf_counter()
        self._score(batch, rollout, row_groups)
        self.seconds["sampling"] += scoring - started
        self.seconds["scoring"] += time.perf_counter() - scoring
        self._keep_examples(batch, groups, texts, grades)
        self.questions += len(batch)
        self.batches += 1

    def _score(self, batch: PromptBatch, rollout: Rollout, row_groups: list[str]) -> None:
        """One stacked forward per micro-batch over every view: the update's scoring path."""
        scorer = RolloutScorer(
            self.model,
            batch,
            rollout,
            temperature=self.rollout_config.temperature,
            max_rows=self.max_rows,
            max_tokens=self.max_tokens,
            chunk_tokens=self.chunk_tokens,
        )
        requests = [
            ViewRequest(view.name, with_grad=True, entropy=True, divergence=True) for view in self.views
        ]
        every_row = torch.ones(len(rollout), dtype=torch.bool)
        preserving = [view.name for view in self.views if view.role == PRESERVING]
        removing = [view.name for view in self.views if view.role == REMOVING]
        pools = {view.pool: view.name for view in self.views if view.role == POOL}
        for micro in scorer.plan(range(len(rollout)), scorer.rows_per_rollout(requests, every_row)):
            inputs = scorer.inputs(micro, requests, every_row, entropy=True)
            groups = [row_groups[row] for row in micro.rows]
            gate = inputs.advantages if self.advantage_gating else None
            for view in self.views:
                scores = inputs.views[view.name]
                sums = view_token_sums(
                    inputs.logprobs,
                    scores.logprobs,
                    inputs.entropy,
                    scores.entropy,
                    scores.divergence,
                    inputs.response_mask,
                    self.top_ratio,
                )
                self._views.add_rows(groups, view.name, sums)
            pairs = [(p, r) for p in preserving for r in removing]
            if PRESERVING in pools and REMOVING in pools:
                pairs.append((pools[PRESERVING], pools[REMOVING]))
            for p, r in pairs:
                plus, minus = inputs.views[p], inputs.views[r]
                sums = pair_token_sums(
                    inputs.logprobs,
                    plus.logprobs,
                    minus.logprobs,
                    inputs.entropy,
                    minus.entropy,
                    inputs.response_mask,
                    gate,
                    self.top_ratio,
                    self.tau,
                )
                self._pairs.add_rows(groups, pair_key(p, r), sums)
        self.forwards += scorer.forwards

    def _keep_examples(
        self,
        batch: PromptBatch,
        groups: list[str],
        texts: Mapping[str, list[str]],
        grades: Mapping[str, list[float]],
    ) -> None:
        for index in range(len(batch)):
            if len(self.examples) >= self.keep_examples:
                return
            first = index * self.samples  # the first sample of this question under each view
            self.examples.append(
                {
                    "id": batch.ids[index],
                    "question": batch.questions[index] if batch.questions else "",
                    "answer": batch.answers[index],
                    "group": groups[index],
                    "images": {view: np.asarray(images[index]) for view, images in batch.images.items()},
                    "completions": {
                        view: {"text": texts[view][first], "correct": grades[view][first]} for view in texts
                    },
                }
            )

    # ---- the result -------------------------------------------------------------------------

    def _figures(self, group: str, name: str) -> ViewFigures:
        samples = self._accuracy.get(group, name, "samples")
        accuracy = _ratio(self._accuracy.get(group, name, "correct"), samples) if samples else None
        questions = int(round(self._accuracy.get(group, ORIGINAL, "samples"))) // self.samples
        if name == ORIGINAL:
            tokens = self._views.get(group, GREY, "tokens")
            return ViewFigures(questions=questions, accuracy=accuracy, tokens=int(tokens))
        get = functools.partial(self._views.get, group, name)
        tokens = get("tokens")
        return ViewFigures(
            questions=questions,
            accuracy=accuracy,
            k3=_ratio(get("k3"), tokens),
            kl=_ratio(get("kl"), tokens),
            entropy_shift=_ratio(get("entropy_shift"), tokens),
            positive_shift_fraction=_ratio(get("positive_shift"), tokens),
            perception_fraction=_ratio(get("perception"), tokens),
            concentration=_ratio(get("rise_perception"), get("rise")),
            tokens=int(tokens),
        )

    def _pair(self, group: str, key: str) -> PairFigures:
        get = functools.partial(self._pairs.get, group, key)
        tokens = get("tokens")
        return PairFigures(
            direction=_ratio(get("direction"), tokens) if tokens else None,
            ties=_ratio(get("ties"), tokens),
            d_plus=_ratio(get("d_plus"), tokens),
            d_minus=_ratio(get("d_minus"), tokens),
            cpl=_ratio(get("cpl"), tokens),
            tokens=int(tokens),
        )

    def result(self, settings: Mapping[str, Any] | None = None) -> AuditResult:
        """Figures per group and view, verdicts, CPL directions and the proposed pools.

        Raises:
            ValueError: no batch was added.
        """
        if not self.batches:
            raise ValueError("the audit has no data: add at least one batch")
        groups = [ALL, *self._group_names]
        names = [ORIGINAL, *(view.name for view in self.views)]
        figures = {group: {name: self._figures(group, name) for name in names} for group in groups}
        verdicts = {
            group: {
                view.name: self.rule.verdict(
                    view.role, figures[group][view.name], figures[group][ORIGINAL], figures[group][GREY]
                )
                for view in self.views
                if view.role in (PRESERVING, REMOVING)
            }
            for group in groups
        }
        keys = sorted({key for (_, key, _) in self._pairs.values})
        pairs = {group: {key: self._pair(group, key) for key in keys} for group in groups}
        pools = {view.pool: view.name for view in self.views if view.role == POOL}
        configured = {}
        if PRESERVING in pools and REMOVING in pools:
            key = pair_key(pools[PRESERVING], pools[REMOVING])
            configured = {group: pairs[group].pop(key) for group in groups}
        proposal = propose_pools(self.views, verdicts, pairs)
        info = {
            "questions": self.questions,
            "samples_per_question": self.samples,
            "temperature": self.rollout_config.temperature,
            "max_new_tokens": self.rollout_config.max_new_tokens,
            "accuracy": f"sampled avg@{self.samples}"
            + ("" if self.view_accuracy else " under I only (views: divergences alone)"),
            "top_ratio": self.top_ratio,
            "tau": self.tau,
            "advantage_gating": self.advantage_gating,
            "group_key": self.group_key,
            "forwards": self.forwards,
            "seconds_sampling": round(self.seconds["sampling"], 1),
            "seconds_scoring": round(self.seconds["scoring"], 1),
            "neutral_cpl": NEUTRAL_CPL,
            **(settings or {}),
        }
        return AuditResult(
            views=list(self.views),
            groups=groups,
            figures=figures,
            verdicts=verdicts,
            pairs=pairs,
            configured=configured,
            proposal=proposal,
            rule=self.rule,
            settings=info,
            examples=self.examples,
        )
