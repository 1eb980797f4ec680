"""The update phase's data path: micro-batch plans, mini-batch counts, and the one scoring function.

Everything the update computes with the policy goes through :class:`RolloutScorer`:

- :meth:`RolloutScorer.inputs` turns rollout rows and the objective's view requests into dense
  :class:`~cppo_lightning.objectives.ObjectiveInputs`: it stacks the image views of a micro-batch
  (``I`` for every row, each with-gradient view only for its rows), runs **one** forward of the
  backbone, applies the language-model head chunk by chunk over the response tokens, splits the
  stack and writes each view back as a dense ``[R, T]`` tensor; reference and frozen (no-grad,
  pre-update) views come from :meth:`RolloutScorer.precompute`.
- :func:`plan_micro_batches` groups rows into micro-batches by a row limit and/or a token budget,
  longest first, so that rows of similar lengths share a forward and padding stays small.
- :func:`mini_batch_counts` gives the mini-batch's denominators (:class:`BatchCounts`) so that the
  loss of a mini-batch does not depend on how it is cut into micro-batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cppo_lightning.batch import ORIGINAL, TEXT_KEYS, PromptBatch, concat_vision_inputs
from cppo_lightning.models.scoring import (
    LanguageModelHead,
    completion_hidden_states,
    divergence_positions,
    score_positions,
)
from cppo_lightning.objectives import BatchCounts, ObjectiveInputs, ViewRequest, ViewScores
from cppo_lightning.rollout import Rollout
from cppo_lightning.sharding import run_gathered

log = logging.getLogger(__name__)


@dataclass
class UpdateConfig:
    """How one rollout batch becomes optimizer steps.

    The loss of an optimizer step is normalised over its whole mini-batch (see the objective's
    ``aggregation``), so the micro-batch settings change memory and speed, not the gradient.

    Args:
        mini_batch_prompts: prompts per optimizer step (with their ``G`` rollouts each); None: the
            whole batch, one optimizer step per rollout batch (then ``lp_old = lp.detach()`` when the
            trained network sampled, and no old-policy forward runs).
        micro_batch_rollouts: at most this many rollouts per forward (gradient accumulation inside a
            mini-batch); each also carries its perturbed views. None: only the token budget limits.
        max_tokens_per_forward: token budget of one forward: every stacked view row times its padded
            length, prompt (image tokens included) and completion. None: no budget. A rollout that
            alone exceeds it gets a forward of its own, with a warning.
        logits_chunk_tokens: response positions per chunk of the language-model head (its logits are
            recomputed in backward); None: about 128 MiB of fp32 logits per chunk.
        ppo_epochs: passes over the rollouts.
        gradient_clip_val: max gradient norm (None: no clipping).
        shuffle: shuffle rollouts between mini-batches (seeded).
    """

    mini_batch_prompts: int | None = None
    micro_batch_rollouts: int | None = 8
    max_tokens_per_forward: int | None = None
    logits_chunk_tokens: int | None = None
    ppo_epochs: int = 1
    gradient_clip_val: float | None = 1.0
    shuffle: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "mini_batch_prompts",
            "micro_batch_rollouts",
            "max_tokens_per_forward",
            "logits_chunk_tokens",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be a positive integer or null, got {value!r}")
        if isinstance(self.ppo_epochs, bool) or not isinstance(self.ppo_epochs, int) or self.ppo_epochs < 1:
            problems.append(f"ppo_epochs must be a positive integer, got {self.ppo_epochs!r}")
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            problems.append(f"gradient_clip_val must be positive or null, got {self.gradient_clip_val!r}")
        if problems:
            raise ValueError("update: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- plans


@dataclass
class MicroBatch:
    """Rollout rows scored in one forward, and the padded lengths they share.

    Attributes:
        rows: rollout row indices.
        prompt_length: prompt columns kept (the longest prompt of these rows).
        completion_length: completion columns kept (the longest completion of these rows).
        stacked_rows: rows of the stacked forward (each rollout plus its with-gradient views).
    """

    rows: list[int]
    prompt_length: int
    completion_length: int
    stacked_rows: int

    @property
    def tokens(self) -> int:
        """Tokens of the stacked forward, padding included: what the budget counts."""
        return self.stacked_rows * (self.prompt_length + self.completion_length)


def plan_micro_batches(
    rows: Sequence[int],
    prompt_lengths: Sequence[int],
    completion_lengths: Sequence[int],
    stacked: Sequence[int],
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> list[MicroBatch]:
    """Group rollout rows into micro-batches under a row limit and a token budget.

    Rows are sorted by prompt length, then completion length, longest first, and packed greedily:
    a row joins the current micro-batch if the stacked forward, padded to the longest prompt and
    the longest completion among its rows, stays within ``max_tokens`` and the micro-batch within
    ``max_rows``. Prompts are padded on the left and completions on the right, so a micro-batch's
    width is ``max(prompt) + max(completion)``; sorting on both keeps the ``G`` rollouts of a prompt
    together and orders them by completion length (on a mixed-length batch of 16 prompts x G=5 it
    left 12 % padding against 15 % for sorting by total length and 31 % for arrival order; see
    ``benchmarks/step_time.py``). A row whose forward alone exceeds the budget forms a micro-batch
    of its own (the caller warns).

    Args:
        rows: the rollout rows to plan (indices into the three length sequences).
        prompt_lengths: real prompt tokens of each rollout row (image tokens included).
        completion_lengths: real completion tokens of each rollout row.
        stacked: rows each rollout row puts in the stacked forward (1 + its with-gradient views).
        max_rows: at most this many rollout rows per micro-batch (None: no limit).
        max_tokens: token budget per forward (None: no budget).

    Returns:
        list[MicroBatch]: every row exactly once, in planning order.
    """
    order = sorted(rows, key=lambda r: (-prompt_lengths[r], -completion_lengths[r], r))
    plans: list[MicroBatch] = []
    current: MicroBatch | None = None
    for row in order:
        p, c, s = int(prompt_lengths[row]), int(completion_lengths[row]), int(stacked[row])
        if current is not None:
            grown = MicroBatch(
                current.rows + [row],
                max(current.prompt_length, p),
                max(current.completion_length, c),
                current.stacked_rows + s,
            )
            fits_rows = max_rows is None or len(grown.rows) <= max_rows
            fits_tokens = max_tokens is None or grown.tokens <= max_tokens
            if fits_rows and fits_tokens:
                current = grown
                continue
            plans.append(current)
        current = MicroBatch([row], p, c, s)
    if current is not None:
        plans.append(current)
    return plans


def split_to_count(
    plans: list[MicroBatch], count: int, lengths: tuple[Sequence[int], Sequence[int], Sequence[int]]
) -> list[MicroBatch]:
    """Split the largest micro-batches until there are ``count`` (sharded strategies need every rank
    to run the same number of forwards).

    Args:
        plans: micro-batches from :func:`plan_micro_batches`.
        count: the number wanted (at most the number of rows).
        lengths: ``(prompt_lengths, completion_lengths, stacked)`` as given to the planner.
    """
    plans = list(plans)
    prompts, completions, stacked = lengths
    while len(plans) < count:
        index = max(range(len(plans)), key=lambda i: (len(plans[i].rows), plans[i].tokens))
        rows = plans[index].rows
        if len(rows) < 2:
            raise ValueError(f"cannot split {len(plans)} micro-batches of single rows into {count}")
        halves = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
        plans[index : index + 1] = [
            MicroBatch(
                half,
                max(int(prompts[r]) for r in half),
                max(int(completions[r]) for r in half),
                sum(int(stacked[r]) for r in half),
            )
            for half in halves
        ]
    return plans


def padding_fraction(plans: Iterable[MicroBatch], prompt_lengths, completion_lengths, stacked) -> float:
    """Fraction of the planned forwards' tokens that are padding."""
    plans = list(plans)
    padded = sum(plan.tokens for plan in plans)
    real = sum(
        int(stacked[r]) * (int(prompt_lengths[r]) + int(completion_lengths[r]))
        for plan in plans
        for r in plan.rows
    )
    return 1.0 - real / padded if padded else 0.0


def mini_batch_counts(
    rows: Sequence[int],
    completion_lengths: Sequence[int],
    view_rows: dict[str, Sequence[bool]],
    micro_batches: int,
) -> dict[str, float]:
    """This rank's counts of one mini-batch (sum them over ranks for :class:`BatchCounts`).

    Returns:
        ``tokens`` (response tokens), ``sequences`` (rows with at least one), ``rows``, and for each
        view ``view:<name>`` (response tokens of the rows that have it).
    """
    counts = {
        "tokens": float(sum(completion_lengths[r] for r in rows)),
        "sequences": float(sum(1 for r in rows if completion_lengths[r] > 0)),
        "rows": float(len(rows)),
    }
    for name, has_view in view_rows.items():
        counts[f"view:{name}"] = float(sum(completion_lengths[r] for r in rows if has_view[r]))
    return counts


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class _Part:
    """One block of the stacked forward: a view for some rows of the micro-batch."""

    view: str
    local: Tensor  # [n] positions of these rows in the micro-batch (long)
    entropy: bool = False


@dataclass
class Precomputed:
    """[N, C] no-grad scores of every rollout, computed once before the update.

    Attributes:
        old_logprobs: under the pre-update policy, when more than one optimizer step follows (or the
            sampler is not the trained network).
        ref_logprobs: under the reference policy, when the objective has a KL term.
        views: frozen views (requested ``with_grad=False``) under the pre-update policy.
    """

    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    views: dict[str, Tensor] = field(default_factory=dict)


class RolloutScorer:
    """Scores the rollouts of one batch for the update: the one place the policy meets them.

    Args:
        model: the policy network (a PEFT wrapper under LoRA/QLoRA).
        batch: the prompts.
        rollout: the sampled completions, rewards and advantages.
        temperature: the sampling temperature (divides the logits, as in ``generate``).
        max_rows: :attr:`UpdateConfig.micro_batch_rollouts`.
        max_tokens: :attr:`UpdateConfig.max_tokens_per_forward`.
        chunk_tokens: :attr:`UpdateConfig.logits_chunk_tokens`.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: PromptBatch,
        rollout: Rollout,
        temperature: float = 1.0,
        max_rows: int | None = None,
        max_tokens: int | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.batch = batch
        self.rollout = rollout
        self.temperature = temperature
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.chunk_tokens = chunk_tokens
        self.device = rollout.completion_ids.device
        # The one device-to-host copy of the plan's inputs: every later decision is made on the CPU.
        rows_prompt = batch.prompt_lengths()
        self.example_rows = rollout.example_rows.tolist()
        self.prompt_lengths = [rows_prompt[e] for e in self.example_rows]
        mask = rollout.completion_mask.cpu()
        lengths = mask.sum(dim=1)
        if not torch.equal(mask, torch.arange(mask.shape[1]) < lengths.unsqueeze(1)):
            raise ValueError("rollout.completion_mask must be True on a prefix of each row (up to its EOS)")
        self.completion_lengths = lengths.tolist()
        self.advantages = rollout.advantages.detach().cpu()
        self.precomputed = Precomputed()
        self.forwards = 0
        self._warned: set[int] = set()

    # ---- plans ----------------------------------------------------------------------------

    def stacked_rows(self, requests: Sequence[ViewRequest], view_rows: Tensor) -> list[int]:
        """Rows each rollout row adds to a stacked forward: 1 + its with-gradient views."""
        extra = sum(1 for request in requests if request.with_grad)
        return [1 + (extra if bool(has) else 0) for has in view_rows.tolist()]

    def plan(self, rows: Sequence[int], stacked: Sequence[int]) -> list[MicroBatch]:
        """Micro-batches of ``rows`` under this scorer's row limit and token budget (with a warning for
        a row that alone exceeds the budget)."""
        plans = plan_micro_batches(
            rows, self.prompt_lengths, self.completion_lengths, stacked, self.max_rows, self.max_tokens
        )
        over = [plan for plan in plans if self.max_tokens is not None and plan.tokens > self.max_tokens]
        new = [plan for plan in over if plan.rows[0] not in self._warned]
        if new:  # once per rollout and batch, not once per pass
            largest = max(new, key=lambda plan: plan.tokens)
            log.warning(
                "%d rollout(s) alone need more than max_tokens_per_forward=%d tokens per forward (the "
                "largest, rollout %d, %d: %d stacked rows x %d): each gets a forward of its own",
                len(new),
                self.max_tokens,
                largest.rows[0],
                largest.tokens,
                largest.stacked_rows,
                largest.prompt_length + largest.completion_length,
            )
            self._warned.update(plan.rows[0] for plan in new)
        return plans

    def micro_batch(self, rows: Sequence[int], stacked: int | None = None) -> MicroBatch:
        """A micro-batch of exactly these rows (lengths from the rollout)."""
        return MicroBatch(
            list(rows),
            max(self.prompt_lengths[r] for r in rows),
            max(self.completion_lengths[r] for r in rows),
            len(rows) if stacked is None else stacked,
        )

    # ---- the forward ------------------------------------------------------------------------

    def _forward(
        self,
        model: nn.Module,
        micro: MicroBatch,
        parts: list[_Part],
        divergences: dict[str, int] | None = None,
    ) -> tuple[list[Tensor], list[Tensor | None], dict[str, Tensor]]:
        """One forward over the stacked parts; dense [n_part, T] log-probs and entropies per part.

        Under FSDP2 the whole of it runs with the network's root unit gathered once (the output head's
        weight among it, for every chunk of the head), see :func:`cppo_lightning.sharding.run_gathered`.
        """
        return run_gathered(model, self._score_parts, model, micro, parts, divergences)

    def _score_parts(
        self,
        model: nn.Module,
        micro: MicroBatch,
        parts: list[_Part],
        divergences: dict[str, int] | None = None,
    ) -> tuple[list[Tensor], list[Tensor | None], dict[str, Tensor]]:
        """The body of :meth:`_forward`.

        ``divergences`` maps a part index to the part holding the original image, for which the
        exact full-vocabulary KL of the original's distribution to this part's is computed.
        """
        rows = torch.as_tensor(micro.rows, dtype=torch.long)
        length = micro.completion_length
        parts = [part for part in parts if len(part.local)]
        pieces = []
        for part in parts:
            examples = [self.example_rows[r] for r in rows[part.local].tolist()]
            pieces.append(self.batch.model_inputs(part.view, examples, prompt_length=micro.prompt_length))
        inputs = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0] if key in TEXT_KEYS}
        inputs.update(
            concat_vision_inputs([{k: v for k, v in p.items() if k not in TEXT_KEYS} for p in pieces])
        )
        stacked = torch.cat([rows[part.local] for part in parts])
        index = stacked.to(self.device)
        completion = self.rollout.completion_ids[index, :length]
        mask = self.rollout.completion_mask[index, :length]
        self.forwards += 1
        hidden = completion_hidden_states(model, inputs, completion, mask)
        width = hidden.shape[-1]
        flat_hidden, flat_ids = hidden.reshape(-1, width), completion.reshape(-1)
        head = LanguageModelHead.of(model)
        sizes = [len(part.local) for part in parts]
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        # Positions of the response tokens in the flattened stack, from the lengths on the CPU: a
        # boolean-mask index would cost a device sync per part.
        lengths = [self.completion_lengths[r] for r in stacked.tolist()]
        positions = [
            _positions(lengths[starts[n] : starts[n + 1]], length, starts[n] * length, self.device)
            for n in range(len(parts))
        ]
        logprobs, entropies = [], []
        for number, part in enumerate(parts):
            where = positions[number]
            scores = score_positions(
                head,
                flat_hidden.index_select(0, where),
                flat_ids.index_select(0, where),
                self.temperature,
                entropy=part.entropy,
                chunk_tokens=self.chunk_tokens,
            )
            block = (sizes[number], length)
            offset = starts[number] * length
            logprobs.append(_dense(scores.logprobs, where - offset, block))
            entropies.append(_dense(scores.entropy, where - offset, block) if part.entropy else None)
        divergence = {}
        for number, anchor in (divergences or {}).items():
            view, original = parts[number], parts[anchor]
            # The view's rows, located in the original part (which has every row of the micro-batch).
            slot = torch.full((len(micro.rows),), -1, dtype=torch.long)
            slot[original.local] = torch.arange(len(original.local))
            anchor_rows = (slot[view.local] + starts[anchor]).tolist()
            where = positions[number]
            anchor_where = _positions(
                [lengths[r] for r in anchor_rows], length, 0, self.device, rows=anchor_rows
            )
            values = divergence_positions(
                head,
                flat_hidden.index_select(0, anchor_where),
                flat_hidden.index_select(0, where),
                self.temperature,
                chunk_tokens=self.chunk_tokens,
            )
            divergence[view.view] = _dense(values, where - starts[number] * length, (sizes[number], length))
        return logprobs, entropies, divergence

    def inputs(
        self,
        micro: MicroBatch,
        requests: Sequence[ViewRequest],
        view_rows: Tensor,
        entropy: bool = False,
        model: nn.Module | None = None,
    ) -> ObjectiveInputs:
        """Dense objective inputs for one micro-batch, from one forward.

        Args:
            micro: the rows and their padded lengths.
            requests: the objective's view requests; with-gradient ones are computed here (for the
                rows of ``view_rows``), the others come from :meth:`precompute`.
            view_rows: [N] bool over the rollout, the rows that get the with-gradient views.
            entropy: compute the entropy under ``I`` (and under the views that request it).
            model: the network (default: the policy).

        Returns:
            ObjectiveInputs without ``counts`` and ``selection`` (the update loop adds them).
        """
        model = self.model if model is None else model
        rows = torch.as_tensor(micro.rows, dtype=torch.long)
        count = len(micro.rows)
        length = micro.completion_length
        local_view_rows = view_rows[rows]
        grad_requests = [request for request in requests if request.with_grad]
        subset = local_view_rows.nonzero().flatten()
        parts = [_Part(ORIGINAL, torch.arange(count), entropy=entropy)]
        parts += [
            _Part(request.name, subset, entropy=entropy and request.entropy) for request in grad_requests
        ]
        divergences = {
            number: 0
            for number, request in enumerate(grad_requests, start=1)
            if request.divergence and len(subset)
        }
        logprobs, entropies, divergence = self._forward(model, micro, parts, divergences)
        device_rows = rows.to(self.device)
        original = logprobs[0]
        has_view = local_view_rows.to(self.device)
        subset_device = subset.to(self.device)
        views: dict[str, ViewScores] = {}
        for number, request in enumerate(grad_requests, start=1):
            if not len(subset):  # no row needs this view: the original stands in (divergence 0)
                lp, h, d = original.detach(), entropies[0], None
            else:
                lp = torch.index_put(original.detach(), (subset_device,), logprobs[number])
                h = entropies[number]
                if h is not None:
                    h = torch.index_put(entropies[0], (subset_device,), h)
                d = divergence.get(request.name)
                if d is not None:
                    d = torch.index_put(torch.zeros_like(original), (subset_device,), d)
            if request.divergence and d is None:
                d = torch.zeros_like(original)
            views[request.name] = ViewScores(lp, has_view, entropy=h, divergence=d)
        precomputed = self.precomputed
        for request in requests:
            if not request.with_grad:
                frozen = precomputed.views[request.name][device_rows, :length]
                views[request.name] = ViewScores(frozen, torch.ones_like(has_view))
        return ObjectiveInputs(
            logprobs=original,
            response_mask=self.rollout.completion_mask[device_rows, :length],
            advantages=self.rollout.advantages[device_rows],
            old_logprobs=_rows(precomputed.old_logprobs, device_rows, length),
            ref_logprobs=_rows(precomputed.ref_logprobs, device_rows, length),
            entropy=entropies[0],
            views=views,
        )

    def bare_inputs(self, micro: MicroBatch) -> ObjectiveInputs:
        """Inputs without any forward (zero log-probs): for selections that read only masks and advantages."""
        rows = torch.as_tensor(micro.rows, device=self.device)
        mask = self.rollout.completion_mask[rows, : micro.completion_length]
        return ObjectiveInputs(
            logprobs=torch.zeros(mask.shape, device=self.device),
            response_mask=mask,
            advantages=self.rollout.advantages[rows],
        )

    @torch.no_grad()
    def score_all(self, model: nn.Module, view: str = ORIGINAL) -> Tensor:
        """[N, C] log-probs of every rollout under one view, no gradient (padding 0)."""
        rollout = self.rollout
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=self.device)
        for micro in self.plan(range(len(rollout)), [1] * len(rollout)):
            (logprobs,), _, _ = self._forward(model, micro, [_Part(view, torch.arange(len(micro.rows)))])
            rows = torch.as_tensor(micro.rows, device=self.device)
            out[rows, : micro.completion_length] = logprobs.float()
        return out

    def precompute(
        self,
        old: bool,
        reference: nn.Module | None,
        frozen_views: Iterable[str],
    ) -> Precomputed:
        """The no-grad scores the update reads: old and reference log-probs, frozen views.

        Args:
            old: compute ``lp_old`` with the current (pre-update) policy.
            reference: the reference network (under LoRA: the policy with its adapters disabled,
                entered by the caller), or None for no KL term.
            frozen_views: views scored once with the pre-update policy (PAPO's masked view).
        """
        if old:
            self.precomputed.old_logprobs = self.score_all(self.model)
        if reference is not None:
            self.precomputed.ref_logprobs = self.score_all(reference)
        for view in frozen_views:
            self.precomputed.views[view] = self.score_all(self.model, view)
        return self.precomputed


def _positions(
    lengths: Sequence[int], width: int, offset: int, device: torch.device, rows: Sequence[int] | None = None
) -> Tensor:
    """Flat indices of the first ``lengths[i]`` positions of rows of ``width`` (row i, or ``rows[i]``)."""
    rows = range(len(lengths)) if rows is None else rows
    index = [offset + row * width + t for row, n in zip(rows, lengths) for t in range(n)]
    return torch.tensor(index, dtype=torch.long).to(device, non_blocking=True)


def _dense(flat: Tensor, where: Tensor, shape: tuple[int, int]) -> Tensor:
    """[R, T] tensor with ``flat`` at the flat positions ``where`` and 0 elsewhere (differentiable)."""
    out = torch.zeros(shape[0] * shape[1], dtype=flat.dtype, device=flat.device)
    return out.index_put((where,), flat).view(shape)


def _rows(values: Tensor | None, rows: Tensor, length: int) -> Tensor | None:
    return None if values is None else values[rows, :length]


def world_counts(counts: dict[str, float], reduce) -> dict[str, float]:
    """Sum counts over ranks with ``reduce`` (a function tensor -> summed tensor), in one collective."""
    if reduce is None:
        return counts
    keys = sorted(counts)
    summed = reduce(torch.tensor([counts[key] for key in keys], dtype=torch.float64))
    return dict(zip(keys, summed.tolist()))


__all__ = [
    "UpdateConfig",
    "MicroBatch",
    "Precomputed",
    "RolloutScorer",
    "BatchCounts",
    "mini_batch_counts",
    "padding_fraction",
    "plan_micro_batches",
    "split_to_count",
    "world_counts",
]
