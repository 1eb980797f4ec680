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
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cppo_lightning.batch import ORIGINAL, TEXT_KEYS, PromptBatch, concat_vision_inputs
from cppo_lightning.engines.base import sampler_kl, sampler_logprob_mismatch
from cppo_lightning.models.grouped import (
    Segment,
    enable_grouped_attention,
    grouped_hidden_states,
    grouping_refusal,
)
from cppo_lightning.models.scoring import (
    LanguageModelHead,
    completion_hidden_states,
    divergence_positions,
    score_positions,
)
from cppo_lightning.models.vision_cache import VisionCache, merge_encoder_outputs, without_pixels
from cppo_lightning.objectives import BatchCounts, ObjectiveInputs, ViewRequest, ViewScores
from cppo_lightning.rollout import Rollout
from cppo_lightning.sharding import clip_by_global_norm, global_grad_norm, is_sharded, run_gathered

log = logging.getLogger(__name__)
_REFUSALS_LOGGED: set[str] = set()


#: Where ``lp_old`` comes from (:attr:`UpdateConfig.old_logprobs`).
OLD_LOGPROBS = ("policy", "sampler")


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
        shared_prefix: compute each prompt once for the rows of its group that share a forward (one
            packed sequence per prompt and view, see :mod:`cppo_lightning.models.grouped`) and encode
            each image once per rollout batch when the vision side is frozen. The same log-probs and
            gradients as one row per rollout (false: today's per-row path, for comparison); an
            architecture that cannot be grouped (Qwen3.5) is scored per row with a warning.
        old_logprobs: where ``lp_old``, the pre-update policy's log-probs of the sampled tokens, comes
            from when the update needs it (several optimizer steps per rollout batch, or a sampler that
            is not the trained network): ``"policy"`` scores the rollouts with the policy in a no-grad
            forward; ``"sampler"`` takes the log-probs the rollout engine reported and skips that
            forward (the sampler then stands in for the old policy, and the rollout correction's
            weights would all be 1, so the two are refused together).
    """

    mini_batch_prompts: int | None = None
    micro_batch_rollouts: int | None = 8
    max_tokens_per_forward: int | None = None
    logits_chunk_tokens: int | None = None
    ppo_epochs: int = 1
    gradient_clip_val: float | None = 1.0
    shuffle: bool = False
    shared_prefix: bool = True
    old_logprobs: str = "policy"

    def __post_init__(self) -> None:
        problems = []
        if self.old_logprobs not in OLD_LOGPROBS:
            problems.append(
                f"old_logprobs must be one of {', '.join(OLD_LOGPROBS)}, got {self.old_logprobs!r}"
            )
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
    #: Tokens of a grouped forward (each prompt once per view, then its rows' completions); None for
    #: one row per rollout.
    packed_tokens: int | None = None

    @property
    def tokens(self) -> int:
        """Tokens of the forward: what the budget counts (padding included for one row per rollout)."""
        if self.packed_tokens is not None:
            return self.packed_tokens
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


@dataclass(frozen=True)
class GroupLengths:
    """What a grouped plan needs to know of each rollout row (indexed by row).

    Attributes:
        examples: the prompt (example) of each row: rows of one example share its prompt.
        prompt_lengths: real prompt tokens of each row's prompt (image tokens included).
        completion_lengths: real completion tokens of each row.
        stacked: image views each row is scored under in a forward (1 + its with-gradient views).
    """

    examples: Sequence[int]
    prompt_lengths: Sequence[int]
    completion_lengths: Sequence[int]
    stacked: Sequence[int]

    def micro_batch(self, rows: Sequence[int]) -> MicroBatch:
        """A grouped micro-batch of these rows, its packed tokens counted: every prompt once per view its
        rows need, plus every row's completion once per view."""
        rows = list(rows)
        views: dict[int, int] = {}
        for r in rows:
            views[self.examples[r]] = max(views.get(self.examples[r], 0), int(self.stacked[r]))
        first = {self.examples[r]: r for r in rows}
        packed = sum(int(self.prompt_lengths[first[e]]) * n for e, n in views.items())
        packed += sum(int(self.completion_lengths[r]) * int(self.stacked[r]) for r in rows)
        return MicroBatch(
            rows,
            max(int(self.prompt_lengths[r]) for r in rows),
            max(int(self.completion_lengths[r]) for r in rows),
            sum(int(self.stacked[r]) for r in rows),
            packed_tokens=packed,
        )


def plan_grouped_micro_batches(
    rows: Sequence[int], lengths: GroupLengths, max_rows: int | None = None, max_tokens: int | None = None
) -> list[MicroBatch]:
    """Micro-batches of whole groups for the grouped forward, under a row limit and a token budget.

    A group is the rows of one prompt. Groups are taken largest first and packed greedily while the
    packed tokens (:meth:`GroupLengths.micro_batch`: the prompt once per view, not once per row) stay
    within ``max_tokens`` and the rows within ``max_rows``. A group that alone exceeds either is split
    into runs of its rows (longest completions first), each a micro-batch with its own copy of the
    prompt; a row that alone exceeds the budget gets a micro-batch of its own (the caller warns).

    Returns:
        list[MicroBatch]: every row exactly once, with ``packed_tokens`` set.
    """
    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(int(lengths.examples[r]), []).append(r)
    order = sorted(groups.values(), key=lambda g: (-lengths.micro_batch(g).tokens, g[0]))

    def fits(candidate: list[int]) -> bool:
        if max_rows is not None and len(candidate) > max_rows:
            return False
        return max_tokens is None or lengths.micro_batch(candidate).tokens <= max_tokens

    plans: list[MicroBatch] = []
    current: list[int] = []
    for group in order:
        if current and fits(current + group):
            current = current + group
            continue
        if current:
            plans.append(lengths.micro_batch(current))
            current = []
        if fits(group):
            current = list(group)
            continue
        # Split the group: runs of its rows, longest completions first, each with the prompt again.
        run: list[int] = []
        for r in sorted(group, key=lambda r: (-int(lengths.completion_lengths[r]), r)):
            if run and not fits(run + [r]):
                plans.append(lengths.micro_batch(run))
                run = []
            run.append(r)
        if run:
            plans.append(lengths.micro_batch(run))
    if current:
        plans.append(lengths.micro_batch(current))
    return plans


def split_to_count(
    plans: list[MicroBatch],
    count: int,
    lengths: tuple[Sequence[int], Sequence[int], Sequence[int]] | GroupLengths,
) -> list[MicroBatch]:
    """Split the largest micro-batches until there are ``count`` (sharded strategies need every rank
    to run the same number of forwards).

    Args:
        plans: micro-batches from :func:`plan_micro_batches`.
        count: the number wanted (at most the number of rows).
        lengths: ``(prompt_lengths, completion_lengths, stacked)`` as given to the planner, or the
            :class:`GroupLengths` of a grouped plan.
    """
    plans = list(plans)
    while len(plans) < count:
        index = max(range(len(plans)), key=lambda i: (len(plans[i].rows), plans[i].tokens))
        rows = plans[index].rows
        if len(rows) < 2:
            raise ValueError(f"cannot split {len(plans)} micro-batches of single rows into {count}")
        halves = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
        if isinstance(lengths, GroupLengths):
            plans[index : index + 1] = [lengths.micro_batch(half) for half in halves]
            continue
        prompts, completions, stacked = lengths
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
    """Fraction of the planned forwards' tokens that are padding (0 for grouped forwards, whose flat
    sequence has none)."""
    plans = [plan for plan in plans if plan.packed_tokens is None]
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
        old_logprobs: ``lp_old``, when more than one optimizer step follows (or the sampler is not the
            trained network): the pre-update policy's, or the sampler's with ``old_logprobs: sampler``.
        ref_logprobs: under the reference policy, when the objective has a KL term.
        sampler_logprobs: what the rollout engine reported, when the objective corrects for the sampler.
        views: frozen views (requested ``with_grad=False``) under the pre-update policy.
    """

    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    sampler_logprobs: Tensor | None = None
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
        shared_prefix: :attr:`UpdateConfig.shared_prefix`: group the rows of a prompt into one forward
            and encode each image once per rollout batch (frozen vision side).
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
        shared_prefix: bool = True,
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
        self.shared_prefix = shared_prefix
        self.vision_cache = VisionCache(batch) if shared_prefix else None
        #: Prompt tokens the forwards computed, and those one row per rollout and view would have.
        self.prompt_tokens_computed = 0
        self.prompt_tokens_per_row = 0
        self._grouping: dict[int, bool] = {}
        self._cache_usable: dict[int, bool] = {}
        self._prompts: dict[int, dict[str, Tensor]] = {}
        self._warned: set[int] = set()

    # ---- plans ----------------------------------------------------------------------------

    def rows_per_rollout(self, requests: Sequence[ViewRequest], view_rows: Tensor) -> list[int]:
        """Rows each rollout row adds to a stacked forward: 1 + its with-gradient views."""
        extra = sum(1 for request in requests if request.with_grad)
        return [1 + (extra if bool(has) else 0) for has in view_rows.tolist()]

    def plan(self, rows: Sequence[int], stacked: Sequence[int]) -> list[MicroBatch]:
        """Micro-batches of ``rows`` under this scorer's row limit and token budget (with a warning for
        a row that alone exceeds the budget).

        Grouped forwards (``shared_prefix``) hold whole groups and count packed tokens (each prompt once
        per view); one row per rollout counts stacked rows times their padded length.
        """
        lengths = self.plan_lengths(stacked)
        if isinstance(lengths, GroupLengths):
            plans = plan_grouped_micro_batches(rows, lengths, self.max_rows, self.max_tokens)
        else:
            plans = plan_micro_batches(rows, *lengths, self.max_rows, self.max_tokens)
        over = [plan for plan in plans if self.max_tokens is not None and plan.tokens > self.max_tokens]
        new = [plan for plan in over if plan.rows[0] not in self._warned]
        if new:  # once per rollout and batch, not once per pass
            largest = max(new, key=lambda plan: plan.tokens)
            log.warning(
                "%d rollout(s) alone need more than max_tokens_per_forward=%d tokens per forward (the "
                "largest, rollout %d, %d tokens in %d stacked rows): each gets a forward of its own",
                len(new),
                self.max_tokens,
                largest.rows[0],
                largest.tokens,
                largest.stacked_rows,
            )
            self._warned.update(plan.rows[0] for plan in new)
        return plans

    def plan_lengths(self, stacked: Sequence[int]) -> tuple[list[int], list[int], list[int]] | GroupLengths:
        """What the planner (and :func:`split_to_count`) needs: :class:`GroupLengths` for grouped forwards,
        ``(prompt_lengths, completion_lengths, stacked)`` for one row per rollout."""
        if self._groups(self.model):
            return GroupLengths(
                self.example_rows, self.prompt_lengths, self.completion_lengths, list(stacked)
            )
        return self.prompt_lengths, self.completion_lengths, list(stacked)

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
        stacked = torch.cat([rows[part.local] for part in parts])
        self.forwards += 1
        self.prompt_tokens_per_row += sum(self.prompt_lengths[r] for r in stacked.tolist())
        if self._groups(model):
            hidden = self._grouped_hidden(model, parts, rows, length)
        else:
            hidden = self._row_hidden(model, parts, rows, stacked, micro.prompt_length, length)
        completion = self.rollout.completion_ids[stacked.to(self.device), :length]
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

    def _groups(self, model: nn.Module) -> bool:
        """Whether ``model``'s forwards are grouped (``shared_prefix`` and an architecture that can be)."""
        key = id(model)
        if key not in self._grouping:
            grouped = self.shared_prefix and enable_grouped_attention(model)
            if self.shared_prefix and not grouped:
                reason = grouping_refusal(model)
                if reason not in _REFUSALS_LOGGED:
                    _REFUSALS_LOGGED.add(reason)
                    log.warning("update.shared_prefix: scoring one row per rollout (%s)", reason)
            self._grouping[key] = grouped
        return self._grouping[key]

    def _caches(self, model: nn.Module) -> bool:
        """Whether ``model``'s image features come from the rollout batch's :class:`VisionCache`."""
        key = id(model)
        if key not in self._cache_usable:
            self._cache_usable[key] = self.vision_cache is not None and VisionCache.usable(model)
        return self._cache_usable[key]

    def _encoder_outputs(self, model: nn.Module, view: str, examples: Sequence[int]):
        """Cached image features of these examples (None: the forward encodes its images itself)."""
        return self.vision_cache.outputs(model, view, examples) if self._caches(model) else None

    def _row_hidden(
        self,
        model: nn.Module,
        parts: list[_Part],
        rows: Tensor,
        stacked: Tensor,
        prompt_length: int,
        length: int,
    ) -> Tensor:
        """[R, length, H] hidden states of the stacked rows, one row per rollout and view (left-padded prompts)."""
        pieces = []
        for part in parts:
            examples = [self.example_rows[r] for r in rows[part.local].tolist()]
            inputs = self.batch.model_inputs(part.view, examples, prompt_length=prompt_length)
            cached = self._encoder_outputs(model, part.view, examples)
            if cached is not None:
                inputs = without_pixels(inputs)
                inputs["mm_encoder_outputs"] = cached
            pieces.append(inputs)
        inputs = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0] if key in TEXT_KEYS}
        if "mm_encoder_outputs" in pieces[0]:
            inputs["mm_encoder_outputs"] = {
                "image": merge_encoder_outputs([piece["mm_encoder_outputs"] for piece in pieces])
            }
        vision = [
            {k: v for k, v in p.items() if k not in TEXT_KEYS and k != "mm_encoder_outputs"} for p in pieces
        ]
        inputs.update(concat_vision_inputs(vision))
        self.prompt_tokens_computed += sum(self.prompt_lengths[r] for r in stacked.tolist())
        index = stacked.to(self.device)
        completion = self.rollout.completion_ids[index, :length]
        mask = self.rollout.completion_mask[index, :length]
        return completion_hidden_states(model, inputs, completion, mask)

    def _grouped_hidden(self, model: nn.Module, parts: list[_Part], rows: Tensor, length: int) -> Tensor:
        """[R, length, H] hidden states of the stacked rows from one grouped forward (see
        :mod:`cppo_lightning.models.grouped`): one segment per (view, prompt) of the micro-batch."""
        keys: dict[tuple[str, int], int] = {}
        members: list[list[int]] = []  # stacked positions of each segment's completions
        order: list[tuple[str, int]] = []
        stacked_rows = []
        for part in parts:
            for row in rows[part.local].tolist():
                key = (part.view, self.example_rows[row])
                if key not in keys:
                    keys[key] = len(order)
                    order.append(key)
                    members.append([])
                members[keys[key]].append(len(stacked_rows))
                stacked_rows.append(row)
        ids = self.rollout.completion_ids
        segments, vision = [], []
        for (view, example), positions in zip(order, members):
            completions = [
                ids[stacked_rows[p], : max(0, self.completion_lengths[stacked_rows[p]] - 1)]
                for p in positions
            ]
            segments.append(Segment.of(self._prompt(example), completions, model))
            vision.append(self.batch.vision[view][example])
        cached = None
        if self._caches(model):
            cached = merge_encoder_outputs(
                [self.vision_cache.outputs(model, view, [example]) for view, example in order]
            )
        hidden, groups = grouped_hidden_states(model, segments, vision, cached)
        self.prompt_tokens_computed += groups.prompt_tokens
        # Row r's state predicting its token t: its prompt's last token for t = 0, its own token t - 1
        # after that; positions past its length are never read (index 0).
        index = torch.zeros(len(stacked_rows), length, dtype=torch.long)
        number = 0
        last = groups.last_prompt_token.cpu()
        flat = groups.completion_index.cpu()
        for segment, positions in enumerate(members):
            for p in positions:
                n = self.completion_lengths[stacked_rows[p]]
                if n:
                    index[p, 0] = last[segment]
                    index[p, 1:n] = flat[number, : n - 1]
                number += 1
        return hidden[index.to(hidden.device)]

    def _prompt(self, example: int) -> dict[str, Tensor]:
        """The prompt's token-axis inputs without padding."""
        if example not in self._prompts:
            valid = self.batch.attention_mask[example].bool()
            prompt = {"input_ids": self.batch.input_ids[example][valid]}
            for key, value in self.batch.text_inputs.items():
                prompt[key] = value[example][valid]
            self._prompts[example] = prompt
        return self._prompts[example]

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
            sampler_logprobs=_rows(precomputed.sampler_logprobs, device_rows, length),
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


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class StepStatistics:
    """Metrics of the optimizer steps of one RL step, kept on the device until they are logged.

    The objective's metrics are shares (see ``BatchCounts``): summed over the micro-batches of an
    optimizer step they give that mini-batch's value; the RL step logs their mean over its steps.

    Attributes:
        forwards: forwards of the update (no-grad scoring included).
        skipped: optimizer steps skipped for a non-finite loss or gradient norm.
        prompt_tokens_saved: fraction of the prompt tokens one row per rollout would compute that the
            grouped forwards did not (0 with ``shared_prefix: false``).
        sampler: the sampler/learner gap of the rollout batch (see :func:`sampler_gap`), when the engine
            reported log-probs.
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    steps: int = 0
    grad_norm: Tensor | None = None
    padding: float = 0.0
    micro_batches: int = 0
    forwards: int = 0
    skipped: int = 0
    prompt_tokens_saved: float = 0.0
    sampler: dict[str, Tensor] = field(default_factory=dict)
    _norms: list[Tensor] = field(default_factory=list)
    _padding: list[float] = field(default_factory=list)
    _micro: list[int] = field(default_factory=list)

    def add(self, metrics: Mapping[str, Tensor]) -> None:
        """Add one micro-batch's metric shares."""
        for key, value in metrics.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def merge(self, step: StepStatistics) -> None:
        """Add one completed optimizer step."""
        for key, value in step.sums.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1
        if step.grad_norm is not None:
            self._norms.append(step.grad_norm.float())
        self._padding.append(step.padding)
        self._micro.append(step.micro_batches)

    def means(self) -> dict[str, float]:
        """Per-step means, with one device-to-host copy."""
        if not self.steps:
            return {}
        keys = sorted(self.sums)
        values = [self.sums[key] / self.steps for key in keys]
        if self._norms:
            keys.append("grad_norm")
            values.append(torch.stack(self._norms).mean())
        means = dict(zip(keys, torch.stack(values).cpu().tolist())) if values else {}
        means["padding_fraction"] = sum(self._padding) / len(self._padding)
        means["micro_batches"] = sum(self._micro) / len(self._micro)
        return means


@dataclass(frozen=True)
class Collective:
    """What the update needs from the other ranks, passed explicitly (one process: nothing).

    Args:
        world_size: ranks that share the mini-batch.
        reduce: ``(tensor, op) -> tensor``, ``op`` one of ``"sum"``, ``"max"``: a CPU tensor reduced
            over ranks (None with one rank).
        all_true: ``bool -> bool``, whether a condition holds on every rank.
    """

    world_size: int = 1
    reduce: Callable[[Tensor, str], Tensor] | None = None
    all_true: Callable[[bool], bool] | None = None

    @classmethod
    def of_strategy(cls, strategy, device: torch.device) -> Collective:
        """The collectives of a Lightning strategy (one rank: none)."""
        if strategy.world_size == 1:
            return cls()

        def reduce(tensor: Tensor, op: str = "sum") -> Tensor:
            return strategy.reduce(tensor.to(device), reduce_op=op).cpu()

        def all_true(condition: bool) -> bool:
            return bool(strategy.reduce_boolean_decision(condition, all=True))

        return cls(strategy.world_size, reduce, all_true)

    def sum(self, counts: dict[str, float]) -> dict[str, float]:
        """Sum named counts over ranks in one collective."""
        return world_counts(counts, self.reduce)

    def most(self, value: int) -> int:
        """The largest ``value`` of any rank."""
        if self.reduce is None:
            return value
        return int(self.reduce(torch.tensor([float(value)]), "max").item())

    def every(self, condition: bool) -> bool:
        """Whether ``condition`` holds on every rank."""
        return condition if self.all_true is None else self.all_true(condition)


class PolicyUpdate:
    """The update of one rollout batch, start to end: the one owner of the update loop.

    Score without gradient what the update reads (old-policy, reference and frozen-view log-probs), then
    per mini-batch: plan its micro-batches, find the token masks in advance when the loss needs their
    mini-batch totals, accumulate the micro-batches' gradients, skip a non-finite step, clip, step the
    optimizer and its scheduler, sync the sampler. Nothing here reads Lightning: the training module
    passes the backward, the gradient clipping and the collectives.

    Args:
        policy: the policy (its model, trainable parameters and reference).
        objective: GRPO, CPPO or PAPO.
        config: the update's settings.
        temperature: the sampling temperature (divides the logits when re-scoring).
        samples_from_policy: whether the rollouts were sampled by the trained network itself (HF); a
            separate sampler (vLLM) needs the old policy scored.
        collective: the other ranks (default: one process).
        backward: ``(loss, last_micro_batch) -> None`` (default: ``loss.backward()``).
        clip: ``(optimizer, max_norm) -> None`` (default: ``torch.nn.utils.clip_grad_norm_``).
        phase: ``name -> context manager`` timing a phase (default: none).
        on_step: called after every optimizer step (the module syncs the rollout engine).
    """

    def __init__(
        self,
        policy,
        objective,
        config: UpdateConfig,
        temperature: float = 1.0,
        samples_from_policy: bool = True,
        collective: Collective = Collective(),
        backward: Callable[[Tensor, bool], None] | None = None,
        clip: Callable[[torch.optim.Optimizer, float], None] | None = None,
        phase: Callable[[str], AbstractContextManager] | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        self.policy = policy
        self.objective = objective
        self.config = config
        self.temperature = temperature
        self.samples_from_policy = samples_from_policy
        self.collective = collective
        self._backward = backward or (lambda loss, last: loss.backward())
        self._clip = clip or (
            lambda optimizer, norm: torch.nn.utils.clip_grad_norm_(self._parameters(), norm)
        )
        self._phase = phase or (lambda name: nullcontext())
        self._on_step = on_step or (lambda: None)
        #: Reference forwards run (a test checks that beta = 0 runs none).
        self.reference_passes = 0
        #: Old-policy scoring passes run (none with ``old_logprobs: sampler``).
        self.old_policy_passes = 0
        # The policy's log-probs of the rows of the first optimizer step, taken from its forwards when no
        # old-policy pass ran: what the sampler/learner gap is measured on then.
        self._first_step: tuple[Tensor, Tensor] | None = None
        self.requirements = None
        #: The scorer of the last rollout batch (its no-grad scores, counters).
        self.last_scorer: RolloutScorer | None = None
        #: The trainer's optimizer steps before this update (for messages).
        self.global_step = 0

    def _parameters(self) -> list[nn.Parameter]:
        return list(self.policy.trainable_parameters())

    # ---- no-grad scoring ------------------------------------------------------------------

    def score(self, batch: PromptBatch, rollout: Rollout, optimizer_steps: int = 1) -> RolloutScorer:
        """The scorer of one rollout batch, with the no-grad scores the update reads computed.

        Args:
            batch: the prompts.
            rollout: their rollouts.
            optimizer_steps: optimizer steps that will follow (more than one needs ``lp_old``).
        """
        config = self.config
        self.requirements = needs = self.objective.requirements(rollout.advantages)
        scorer = RolloutScorer(
            self.policy.model,
            batch,
            rollout,
            temperature=self.temperature,
            max_rows=config.micro_batch_rollouts,
            max_tokens=config.max_tokens_per_forward,
            chunk_tokens=config.logits_chunk_tokens,
            shared_prefix=config.shared_prefix,
        )
        self.last_scorer = scorer
        # With one optimizer step per rollout, sampled by the network being trained, the policy that
        # sampled is the one being updated: lp_old == lp.detach() and no old-policy pass is needed.
        # Another sampler (vLLM) is not the trained network: lp_old then comes from the policy, or
        # from the sampler's own log-probs with `old_logprobs: sampler`.
        needs_old = optimizer_steps > 1 or not self.samples_from_policy
        from_sampler = config.old_logprobs == "sampler"
        sampler = rollout.sampler_logprobs
        if sampler is None and (needs.sampler_logprobs or (needs_old and from_sampler)):
            setting = "update.old_logprobs: sampler" if from_sampler else "objective.rollout_correction"
            raise ValueError(f"{setting} needs the rollout engine's log-probs, and this rollout has none")
        precomputed = scorer.precomputed
        if needs.sampler_logprobs:
            precomputed.sampler_logprobs = sampler.float()
        if needs_old and from_sampler:
            precomputed.old_logprobs = sampler.float()
        scores_old = needs_old and not from_sampler
        self.old_policy_passes += int(scores_old)
        self._first_step = None
        if sampler is not None and not scores_old:
            self._first_step = (
                torch.zeros_like(sampler, dtype=torch.float32),
                torch.zeros(len(rollout), dtype=torch.bool),
            )
        with torch.no_grad():
            with self._phase("scoring"):
                scorer.precompute(old=scores_old, reference=None, frozen_views=needs.frozen_views)
            with self._phase("reference"):
                if needs.reference:
                    with self.policy.reference() as reference:
                        scorer.precomputed.ref_logprobs = scorer.score_all(reference)
                    self.reference_passes += 1
        return scorer

    # ---- one mini-batch -------------------------------------------------------------------

    def plan(self, scorer: RolloutScorer, rows: list[int]) -> tuple[list[MicroBatch], BatchCounts, float]:
        """Micro-batches of one mini-batch (the same number on every rank) and its counts."""
        needs = self.requirements
        stacked = scorer.rows_per_rollout(list(needs.views), needs.view_rows)
        plans = scorer.plan(rows, stacked)
        collective = self.collective
        if collective.world_size > 1:
            # Sharded strategies gather weights in every forward: each rank must run as many.
            plans = split_to_count(plans, collective.most(len(plans)), scorer.plan_lengths(stacked))
        has_view = {request.name: needs.view_rows.tolist() for request in needs.grad_views}
        totals = mini_batch_counts(rows, scorer.completion_lengths, has_view, len(plans))
        counts = BatchCounts(
            collective.sum(totals), world_size=collective.world_size, micro_batches=len(plans)
        )
        padding = padding_fraction(plans, scorer.prompt_lengths, scorer.completion_lengths, stacked)
        return plans, counts, padding

    def select_in_advance(
        self, scorer: RolloutScorer, plans: list[MicroBatch], counts: BatchCounts
    ) -> tuple[list[dict[str, Tensor]], BatchCounts]:
        """The objective's token masks for every micro-batch, from a no-grad pass, and their totals.

        The CPL's masked mean runs over the perception tokens of the whole mini-batch, whose number
        is known only once the entropies under ``I`` and ``I-`` are, and a micro-batch's backward
        needs it. So when a mini-batch spans several micro-batches, a forward without gradient (and
        without stored activations) over the rows that can hold perception tokens (``view_rows``:
        ``A > 0`` under gating) and the views the selection reads finds the masks first. The other
        exact methods cost more: a second backward of the CPL into a second gradient buffer, or
        keeping every micro-batch's graph until the last forward.
        """
        needs = self.requirements
        requests = list(needs.selection_views)
        view_rows = needs.view_rows
        found: list[tuple[list[int], MicroBatch, dict[str, Tensor]]] = []
        with torch.no_grad():
            for micro in plans:
                local = [index for index, row in enumerate(micro.rows) if view_rows[row]]
                if not local:
                    found.append((local, micro, {}))
                    continue
                sub = scorer.micro_batch([micro.rows[index] for index in local])
                if needs.entropy or requests:
                    inputs = scorer.inputs(sub, requests, view_rows, entropy=needs.entropy)
                else:
                    inputs = scorer.bare_inputs(sub)
                inputs.counts = counts
                found.append((local, sub, self.objective.select_tokens(inputs).masks))
        names = sorted({name for _, _, masks in found for name in masks})
        selected = []
        device = scorer.device
        for (local, sub, masks), micro in zip(found, plans):
            full = {}
            for name in names:
                mask = torch.zeros(len(micro.rows), micro.completion_length, dtype=torch.bool, device=device)
                if name in masks:
                    mask[torch.as_tensor(local, device=device), : sub.completion_length] = masks[name]
                full[name] = mask
            selected.append(full)
        return selected, counts.with_totals(**self._selection_totals(selected))

    def _selection_totals(self, selected: list[dict[str, Tensor]]) -> dict[str, float]:
        """Selected tokens per name over the mini-batch and every rank (one collective)."""
        names = sorted({name for masks in selected for name in masks})
        if not names:
            return {}
        local = {name: float(sum(masks[name].sum() for masks in selected if name in masks)) for name in names}
        return self.collective.sum(local)

    def accumulate_gradients(
        self,
        scorer: RolloutScorer,
        rows: list[int],
        record: bool = False,
        capture: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[StepStatistics, list[Tensor]]:
        """Backward of one mini-batch's loss, micro-batch by micro-batch, into ``.grad``.

        The gradients equal those of the whole mini-batch in one forward, whatever the micro-batch
        settings (see ``BatchCounts``); the parameters are not updated.

        Args:
            scorer: the rollout batch's scorer (:meth:`score`).
            rows: the mini-batch's rollout rows.
            record: store the objective's per-token diagnostics in the rollout (for callbacks).
            capture: ``([N, C] values, [N] bool rows)`` to store the micro-batches' detached ``lp`` in.

        Returns:
            The mini-batch's metrics (not yet merged) and each micro-batch's loss.
        """
        objective, needs = self.objective, self.requirements
        plans, counts, padding = self.plan(scorer, rows)
        preselected = None
        if needs.needs_advance_selection and len(plans) > 1:
            preselected, counts = self.select_in_advance(scorer, plans, counts)
        step = StepStatistics(padding=padding, micro_batches=len(plans))
        losses = []
        for index, micro in enumerate(plans):
            inputs = scorer.inputs(micro, list(needs.views), needs.view_rows, entropy=needs.entropy)
            inputs.counts = counts
            if needs.selects_tokens:
                if preselected is not None:
                    inputs.selected = preselected[index]
                elif needs.normalises_over_mini_batch:  # one micro-batch: its masks give the totals
                    inputs.selected = objective.select_tokens(inputs).masks
                    counts = counts.with_totals(**self._selection_totals([inputs.selected]))
                    inputs.counts = counts
            output = objective(inputs)
            if capture is not None:
                values, captured = capture
                values[torch.as_tensor(micro.rows, device=values.device), : micro.completion_length] = (
                    inputs.logprobs.detach().float()
                )
                captured[micro.rows] = True
            self._backward(output.loss, index == len(plans) - 1)
            losses.append(output.loss.detach())
            step.add(output.metrics)
            if record:
                scorer.rollout.record(output.diagnostics, torch.as_tensor(micro.rows, device=scorer.device))
        return step, losses

    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        scorer: RolloutScorer,
        rows: list[int],
        statistics: StepStatistics,
        record: bool = False,
    ) -> bool:
        """One optimizer step on one mini-batch; False when it was skipped (non-finite loss or norm)."""
        optimizer.zero_grad(set_to_none=True)
        # Before the first optimizer step the policy is still the old one: its lp there is lp_old.
        capture = self._first_step if statistics.steps == 0 and statistics.skipped == 0 else None
        step, losses = self.accumulate_gradients(scorer, rows, record, capture)
        norm = global_grad_norm(self._parameters(), scorer.device)  # over every shard (FSDP2)
        # One sync per optimizer step: a non-finite loss or gradient norm skips the step on every rank.
        loss_finite = bool(torch.isfinite(torch.stack(losses)).all())
        finite = self.collective.every(loss_finite and bool(torch.isfinite(norm)))
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            statistics.skipped += 1
            problem = "gradient norm" if loss_finite else "loss"
            log.warning("step %d: skipping an optimizer step (non-finite %s)", self.global_step, problem)
            return False
        if self.config.gradient_clip_val is not None and is_sharded(self.policy.model):
            clip_by_global_norm(self._parameters(), self.config.gradient_clip_val, norm)
        elif self.config.gradient_clip_val is not None:
            self._clip(optimizer, self.config.gradient_clip_val)
        optimizer.step()
        step.grad_norm = norm.detach()
        statistics.merge(step)
        self._on_step()
        return True

    # ---- one rollout batch ----------------------------------------------------------------

    def run(
        self, batch: PromptBatch, rollout: Rollout, optimizer: torch.optim.Optimizer, scheduler=None
    ) -> StepStatistics:
        """Optimizer steps on one rollout batch: mini-batches x micro-batches x PPO epochs.

        The scheduler steps after every optimizer step that was taken, not after a skipped one (as in
        the HF Trainer).
        """
        config, group = self.config, rollout.group_size
        mini_rows = (config.mini_batch_prompts or len(batch)) * group
        optimizer_steps = config.ppo_epochs * (len(rollout) // mini_rows)
        scorer = self.score(batch, rollout, optimizer_steps)
        statistics = StepStatistics()
        with self._phase("gradient"):
            for epoch in range(config.ppo_epochs):
                order = torch.arange(len(rollout))
                if config.shuffle:
                    order = order[torch.randperm(len(rollout), device="cpu")]
                for start in range(0, len(rollout), mini_rows):
                    rows = order[start : start + mini_rows].tolist()
                    stepped = self.optimizer_step(optimizer, scorer, rows, statistics, record=epoch == 0)
                    if stepped and scheduler is not None:
                        scheduler.step()
        statistics.forwards = scorer.forwards
        statistics.sampler = self.sampler_gap(scorer)
        if scorer.prompt_tokens_per_row:
            statistics.prompt_tokens_saved = (
                1.0 - scorer.prompt_tokens_computed / scorer.prompt_tokens_per_row
            )
        return statistics

    def sampler_gap(self, scorer: RolloutScorer) -> dict[str, Tensor]:
        """How far the sampler's log-probs are from the policy's, when the engine reported them.

        Measured against the old-policy pass when one ran (every rollout), otherwise against the
        policy's log-probs in the forwards of the first optimizer step (its rows), when the policy
        had not moved yet.

        Returns:
            ``sampler_logprob_mismatch`` (mean ``|lp_mu - lp|`` over response tokens) and ``sampler_kl``
            (:func:`sampler_kl`); empty without sampler log-probs.
        """
        rollout = scorer.rollout
        if rollout.sampler_logprobs is None:
            return {}
        if self._first_step is None:
            policy, mask = scorer.precomputed.old_logprobs, rollout.completion_mask
        else:
            policy, captured = self._first_step
            mask = rollout.completion_mask & captured.to(rollout.completion_mask.device).unsqueeze(1)
        sampler = rollout.sampler_logprobs
        return {
            "sampler_logprob_mismatch": sampler_logprob_mismatch(sampler, policy, mask),
            "sampler_kl": sampler_kl(sampler, policy, mask),
        }


__all__ = [
    "Collective",
    "PolicyUpdate",
    "StepStatistics",
    "UpdateConfig",
    "MicroBatch",
    "Precomputed",
    "RolloutScorer",
    "BatchCounts",
    "mini_batch_counts",
    "padding_fraction",
    "plan_grouped_micro_batches",
    "plan_micro_batches",
    "GroupLengths",
    "split_to_count",
    "world_counts",
]
