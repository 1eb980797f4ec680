"""Pure tensor functions behind GRPO, CPPO and PAPO.

Every function here takes tensors and plain numbers and returns tensors; nothing keeps state.
Tensor shapes are checked here (free, no device sync), and a string that picks a code path must name one;
the numeric hyperparameters (``tau > 0``, ``top_ratio`` in (0, 1], ``dual_clip > 1``, the correction's
cap and band) are preconditions, checked once where they are configured (the objective classes).
Shapes use ``R`` for rows (one row = one rollout of the micro-batch), ``T`` for response
positions, ``V`` for the vocabulary, ``N`` for prompts and ``G`` for rollouts per prompt.
Log-probs are natural-log probabilities of the sampled tokens. The algorithm and every default
follow the CPPO paper (arXiv 2601.00501) and its reference release; each docstring gives the equation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "AGGREGATIONS",
    "ADVANTAGE_SCALES",
    "DIVERGENCES",
    "BatchCounts",
    "NonFiniteError",
    "check_finite",
    "check_same_shape",
    "group_advantages",
    "zero_variance_groups",
    "token_logprobs",
    "token_entropy",
    "log_softmax_at",
    "softmax_entropy",
    "k3_kl",
    "full_kl",
    "masked_aggregate",
    "token_mean",
    "clipped_policy_loss",
    "ROLLOUT_CORRECTIONS",
    "rollout_correction_weights",
    "perception_token_mask",
    "contrastive_perception_loss",
    "contrastive_perception_loss_from_divergences",
    "cpl_direction_indicator",
    "implicit_perception_loss",
    "double_entropy_loss",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "micro-batch-token-mean")
ADVANTAGE_SCALES = ("std", "none")
DIVERGENCES = ("k3", "full_kl")
ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

# Log-ratios and k3 inputs are clamped to this range before exp so that one wildly off token
# cannot turn the loss into inf (exp(20) ~ 4.9e8 is finite in float32 and bfloat16).
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0
ADVANTAGE_EPS = 1e-6
PERCEPTION_EPS = 1e-6
# Elements of [*, V] logits processed at once by the chunked log-prob and entropy kernels when
# no chunk size is given: 2**25 float32 elements = 128 MiB per temporary.
DEFAULT_CHUNK_ELEMENTS = 2**25


class NonFiniteError(ValueError):
    """An input tensor of a loss contains NaN or inf."""


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise ``NonFiniteError`` if ``tensor`` holds any NaN or inf.

    Args:
        name: How the error message refers to the tensor (e.g. ``"ref_logprobs"``).
        tensor: Any floating-point tensor.

    Raises:
        NonFiniteError: With a message like ``"ref_logprobs has 3 non-finite values"``.
    """
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        count = int((~finite).sum())
        noun = "value" if count == 1 else "values"
        raise NonFiniteError(f"{name} has {count} non-finite {noun} (NaN or inf) out of {tensor.numel()}")


def check_same_shape(**tensors: Tensor) -> None:
    """Raise ``ValueError`` unless all keyword tensors have the same shape.

    Args:
        **tensors: Tensors keyed by the name the error message should use.

    Raises:
        ValueError: Naming the first tensor whose shape differs from the first one, e.g.
            ``"logprobs has shape (2, 3) but old_logprobs has shape (2, 4)"``.
    """
    items = list(tensors.items())
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{first_name} has shape {tuple(first.shape)} but {name} has shape {tuple(tensor.shape)}"
            )


@dataclass(frozen=True)
class BatchCounts:
    """Denominators of a mini-batch's loss, so that each micro-batch computes its exact share of it.

    A mini-batch (the rollouts of one optimizer step) is scored in micro-batches whose gradients are
    accumulated. With ``totals`` counted over the whole mini-batch on every rank, a micro-batch's term
    is ``world_size * local_sum / total``: the micro-batch terms add up to the mini-batch mean of this
    rank's share, and DDP's average of the gradients over ranks (hence ``world_size``) makes it the mean
    over all ranks. The gradient of a mini-batch therefore does not depend on how it is cut into
    micro-batches or spread over ranks, and neither do the logged metrics.

    ``totals`` keys used by the functions here: ``"tokens"`` (response tokens), ``"sequences"`` (rows with
    at least one response token), ``"rows"`` (all rows). Objectives add their own (CPPO: its perception
    tokens, ``"perception"``, and ``"view:removing"``, the response tokens of rows with an ``I-`` view).

    ``per_micro_batch=True`` is the reference release's semantics (verl's former ``token-mean``), kept
    for exact reproduction: each micro-batch is normalised by its own counts and the micro-batch terms
    are averaged, so the gradient changes with the micro-batch size. A key missing from ``totals`` is
    normalised that way too; ``BatchCounts()`` is "this micro-batch is the whole mini-batch".

    Attributes:
        totals: count name -> count over the mini-batch, all ranks.
        world_size: number of data-parallel ranks.
        per_micro_batch: normalise each micro-batch by its own counts.
        micro_batches: micro-batches in this rank's mini-batch (used by ``per_micro_batch``).
    """

    totals: Mapping[str, float] = field(default_factory=dict)
    world_size: int = 1
    per_micro_batch: bool = False
    micro_batches: int = 1

    def share(self, local_sum: Tensor, key: str, local_count: Tensor | float) -> Tensor:
        """This micro-batch's share of the mean over the mini-batch's ``key`` elements.

        Args:
            local_sum: 0-dim sum over the micro-batch's ``key`` elements.
            key: the count that normalises it.
            local_count: how many ``key`` elements the micro-batch has (0-dim tensor or number).

        Returns:
            Tensor: 0-dim; ``local_sum / max(count, 1)`` with the mini-batch's or the local count.
        """
        if self.per_micro_batch or key not in self.totals:
            count = torch.as_tensor(local_count, dtype=local_sum.dtype, device=local_sum.device)
            return local_sum / count.clamp(min=1) / self.micro_batches
        return local_sum * (self.world_size / max(float(self.totals[key]), 1.0))

    def with_totals(self, **totals: float) -> BatchCounts:
        """A copy with more (or replaced) totals."""
        return dataclasses.replace(self, totals={**self.totals, **totals})

    def local(self) -> BatchCounts:
        """A copy that normalises by the micro-batch's own counts (the release's semantics)."""
        return dataclasses.replace(self, per_micro_batch=True)


def _check_rank(name: str, tensor: Tensor, rank: int, layout: str) -> None:
    if tensor.dim() != rank:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(tensor.shape)}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, scale: str = "std") -> Tensor:
    """Group-normalised advantages, one per rollout.

    ``A_i = (r_i - mean_g r) / (std_g r + 1e-6)`` over the ``G`` rollouts of the same prompt,
    with the unbiased standard deviation. A group whose rewards are all equal gets exactly 0
    (checked by comparison, not by relying on ``r - mean`` rounding to 0). With
    ``group_size == 1`` every advantage is 0: a lone rollout has nothing to be compared with
    and its standard deviation is undefined.

    Args:
        rewards (Tensor): [N * G] rewards, the ``G`` rollouts of one prompt contiguous.
        group_size: ``G``, rollouts per prompt. Must divide ``len(rewards)``.
        scale: ``"std"`` divides by the group standard deviation (GRPO); ``"none"`` only
            subtracts the group mean (Dr. GRPO).

    Returns:
        Tensor: [N * G] advantages (float32, or the rewards' dtype if it is floating).

    Raises:
        ValueError: If ``group_size`` does not divide the number of rewards, or ``scale`` is
            unknown.
        NonFiniteError: If a reward is NaN or inf.
    """
    _check_choice("advantage scale", scale, ADVANTAGE_SCALES)
    _check_rank("rewards", rewards, 1, "[N * G]")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the number of rewards {rewards.numel()}")
    check_finite("rewards", rewards)
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if group_size == 1:
        return torch.zeros_like(rewards)

    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + ADVANTAGE_EPS)
    return centred.masked_fill(zero_variance_groups(grouped).unsqueeze(1), 0.0).view(-1)


def zero_variance_groups(grouped: Tensor) -> Tensor:
    """[N] bool, the groups of ``grouped`` [N, G] whose rewards are all equal (their advantages are 0:
    GRPO learns nothing from them)."""
    return (grouped == grouped[:, :1]).all(dim=1)


# --------------------------------------------------------------------------------------------
# Log-probs and entropy from logits, chunked
# --------------------------------------------------------------------------------------------


def _blocks(rows: int, tokens: int, vocab: int, chunk_size: int | None) -> Iterator[tuple[slice, slice]]:
    """Yield (row slice, token slice) blocks that cover [rows, tokens].

    ``chunk_size`` counts rows. Without it, blocks hold about ``DEFAULT_CHUNK_ELEMENTS``
    logits: several rows at once for short responses, part of one row for very long ones.
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
        for start in range(0, rows, chunk_size):
            yield slice(start, min(start + chunk_size, rows)), slice(0, tokens)
        return
    per_row = max(1, tokens * vocab)
    rows_per_block = max(1, DEFAULT_CHUNK_ELEMENTS // per_row)
    if rows_per_block > 1 or per_row <= DEFAULT_CHUNK_ELEMENTS:
        for start in range(0, rows, rows_per_block):
            yield slice(start, min(start + rows_per_block, rows)), slice(0, tokens)
        return
    tokens_per_block = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab))
    for row in range(rows):
        for start in range(0, tokens, tokens_per_block):
            yield slice(row, row + 1), slice(start, min(start + tokens_per_block, tokens))


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for half-precision logits (their softmax sums lose too much), else their dtype."""
    return torch.promote_types(logits.dtype, torch.float32)


def _scaled_block(logits: Tensor, temperature: float) -> tuple[Tensor, bool]:
    """One block of logits in the compute dtype divided by the temperature; True if a copy."""
    block = logits.to(_compute_dtype(logits))
    owned = block.data_ptr() != logits.data_ptr()
    if temperature != 1.0:
        block = block.div_(temperature) if owned else block / temperature
        owned = True
    return block, owned


class _TokenLogprobs(torch.autograd.Function):
    """``log softmax(logits / temperature)`` at the sampled tokens, in blocks.

    Autograd through ``gather - logsumexp`` on slices would keep every scaled block alive until
    backward (a full copy of the logits when ``temperature != 1``) and build a full-size zero
    gradient per slice. This function saves only the logits (no copy) and the [R, T] logsumexp,
    and writes the gradient ``(onehot - softmax) * grad / temperature`` block by block into a
    single [R, T, V] tensor.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int | None) -> Tensor:
        rows, length, vocab = logits.shape
        out = torch.empty(rows, length, dtype=_compute_dtype(logits), device=logits.device)
        lse = torch.empty_like(out)
        for r, t in _blocks(rows, length, vocab, chunk_size):
            block, _ = _scaled_block(logits[r, t], temperature)
            block_lse = torch.logsumexp(block, dim=-1)
            lse[r, t] = block_lse
            out[r, t] = block.gather(-1, tokens[r, t].unsqueeze(-1)).squeeze(-1) - block_lse
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        temperature = ctx.temperature
        grad_out = grad_out.to(lse.dtype)
        rows, length, vocab = logits.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for r, t in _blocks(rows, length, vocab, ctx.chunk_size):
            block, owned = _scaled_block(logits[r, t], temperature)
            shifted = block.sub_(lse[r, t].unsqueeze(-1)) if owned else block - lse[r, t].unsqueeze(-1)
            softmax = shifted.exp_()
            g = grad_out[r, t].unsqueeze(-1)
            # d lp / d z = onehot(token) - softmax, then the chain rule through z / temperature.
            softmax.mul_(-g).scatter_add_(-1, tokens[r, t].unsqueeze(-1), g)
            if temperature != 1.0:
                softmax.div_(temperature)
            grad[r, t] = softmax
        return grad, None, None, None


def token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Log-probability of each sampled token under ``softmax(logits / temperature)``.

    Computes ``logit[token] / temperature - logsumexp(logits / temperature)`` in blocks of rows,
    in float32, without materialising a log-softmax of the whole logits. The result carries
    gradient to ``logits``; backward holds one gradient tensor of the logits' size plus one
    block of temporaries. Double backward is not supported.

    Args:
        logits (Tensor): [R, T, V] logits at the positions that predict ``tokens`` (any float
            dtype; may be a non-contiguous view).
        tokens (Tensor): [R, T] sampled token ids; padding positions must hold a valid id too
            (e.g. the pad token), not -100.
        temperature: Sampling temperature of the rollout; must be positive.
        chunk_size: Rows per block. ``None`` picks blocks of about 128 MiB of float32 logits
            (splitting a row along T when one row alone is larger).

    Returns:
        Tensor: [R, T] sampled-token log-probs, float32 (float64 for float64 logits).

    Raises:
        ValueError: On mismatched shapes, token ids outside the vocabulary or a non-positive
            temperature.
    """
    _check_rank("logits", logits, 3, "[R, T, V]")
    _check_rank("tokens", tokens, 2, "[R, T]")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but logits has shape {tuple(logits.shape)}; "
            "expected tokens [R, T] for logits [R, T, V]"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= logits.shape[-1]):
        raise ValueError(
            f"tokens must be ids in [0, {logits.shape[-1]}) (padding included), "
            f"got values in [{int(tokens.min())}, {int(tokens.max())}]"
        )
    return _TokenLogprobs.apply(logits, tokens.long(), float(temperature), chunk_size)


@torch.no_grad()
def token_entropy(logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Full-vocabulary Shannon entropy (nats) of ``softmax(logits / temperature)``.

    Computed under ``no_grad`` (the entropy only selects tokens and is logged) in blocks of
    rows, as ``H = logsumexp(z) - sum_v p_v z_v`` with ``z = logits / temperature``: that needs
    one block of temporaries (``p``) besides the logits for float32 logits at temperature 1,
    and one more (the scaled block) otherwise. Vocabulary entries with logit ``-inf``
    (probability 0) contribute 0; NaN or ``+inf`` logits give a NaN entropy for that position
    instead of a silently wrong number.

    Args:
        logits (Tensor): [R, T, V] logits (any float dtype).
        temperature: Sampling temperature; must be positive.
        chunk_size: Rows per block; ``None`` picks blocks of about 128 MiB of float32 logits.

    Returns:
        Tensor: [R, T] entropies, float32 (float64 for float64 logits), without gradient.
    """
    _check_rank("logits", logits, 3, "[R, T, V]")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rows, length, vocab = logits.shape
    out = torch.empty(rows, length, dtype=_compute_dtype(logits), device=logits.device)
    for r, t in _blocks(rows, length, vocab, chunk_size):
        block, _ = _scaled_block(logits[r, t], temperature)
        lse = torch.logsumexp(block, dim=-1)
        p_z = (block - lse.unsqueeze(-1)).exp_().mul_(block)
        # Where p == 0 because z = -inf the product is 0 * -inf = NaN: such entries add 0 ...
        entropy = lse - p_z.nan_to_num_(nan=0.0).sum(dim=-1)
        # ... but keep NaN where the logits themselves were broken, which nan_to_num would hide.
        out[r, t] = entropy.masked_fill_(~torch.isfinite(lse), float("nan"))
    return out


def log_softmax_at(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[token]`` for flat positions, without input checks.

    The kernel of :func:`token_logprobs` for the update's hot path (the ids were checked when the
    rollout was built): backward holds one gradient of the logits' size and no log-softmax copy.

    Args:
        logits (Tensor): [P, V].
        tokens (Tensor): [P] ids in ``[0, V)``.
        temperature: positive.

    Returns:
        Tensor: [P] log-probs, float32 (float64 for float64 logits).
    """
    return _TokenLogprobs.apply(logits.unsqueeze(0), tokens.long().unsqueeze(0), float(temperature), None)[0]


def softmax_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary entropy of ``softmax(logits / temperature)`` for flat positions, no gradient.

    Args:
        logits (Tensor): [P, V].
        temperature: positive.

    Returns:
        Tensor: [P] entropies (see :func:`token_entropy`).
    """
    return token_entropy(logits.unsqueeze(0), temperature)[0]


# --------------------------------------------------------------------------------------------
# Divergences and aggregation
# --------------------------------------------------------------------------------------------


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 ("low-variance") single-sample estimate of KL(pi || pi_ref) at the sampled tokens.

    ``d = clamp(ref - lp, -20, 20)``, ``kl = clamp(exp(d) - d - 1, -10, 10)``. Nonnegative,
    0 where the two log-probs agree. Gradient flows into both arguments.

    Args:
        logprobs (Tensor): [R, T] log-probs under the distribution the tokens were sampled from
            (``lp^I``).
        ref_logprobs (Tensor): [R, T] log-probs of the same tokens under the other distribution
            (reference policy, or another image view).

    Returns:
        Tensor: [R, T] elementwise estimates.
    """
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(-K3_CLAMP, K3_CLAMP)


def full_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Exact KL(p || q) over the vocabulary, per position.

    Args:
        log_p (Tensor): [R, T, V] log-distribution of the anchor (``log pi(.|I)``).
        log_q (Tensor): [R, T, V] log-distribution of the other view.

    Returns:
        Tensor: [R, T] ``sum_v p_v (log p_v - log q_v)``.
    """
    check_same_shape(log_p=log_p, log_q=log_q)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def masked_aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    max_length: int | None = None,
    counts: BatchCounts | None = None,
) -> Tensor:
    """Reduce per-token values over the response tokens: one micro-batch's share of the mini-batch's.

    Modes (``N`` the counts over the whole mini-batch, all ranks; see :class:`BatchCounts`):

    - ``"token-mean"``: ``sum(v * m) / N_tokens`` (default).
    - ``"seq-mean-token-mean"``: ``sum over rows of each row's token-mean / N_sequences``; rows
      without any response token are left out.
    - ``"seq-mean-token-sum"`` (Dr. GRPO): ``sum over rows of each row's token-sum / N_rows``,
      divided by ``max_length`` when given (a constant generation budget, so that no
      length-dependent normaliser biases the gradient).
    - ``"micro-batch-token-mean"``: the reference release's: the micro-batch's own token-mean,
      divided by the number of micro-batches (so it depends on how the mini-batch is split).

    Without ``counts`` the micro-batch is the whole mini-batch. Masked-out positions never reach
    the result, even if they hold NaN. An all-zero mask gives 0 with a zero (not NaN) gradient.

    Args:
        values (Tensor): [R, T] per-token values.
        mask (Tensor): [R, T] bool (or 0/1) response mask.
        mode: One of ``AGGREGATIONS``.
        max_length: Only for ``"seq-mean-token-sum"``: constant divisor, e.g. the maximum
            response length.
        counts: The mini-batch's denominators (None: this micro-batch's own).

    Returns:
        Tensor: 0-dim aggregate.
    """
    _check_choice("aggregation", mode, AGGREGATIONS)
    check_same_shape(values=values, mask=mask)
    counts = counts if counts is not None else BatchCounts()
    if mode == "micro-batch-token-mean":
        counts = counts.local()
    mask = mask.bool()
    masked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    # Counts in at least float32: bfloat16 cannot even count past 256 exactly.
    row_counts = mask.sum(dim=-1).to(torch.promote_types(values.dtype, torch.float32))
    if mode in ("token-mean", "micro-batch-token-mean"):
        return counts.share(masked.sum(), "tokens", row_counts.sum())
    if mode == "seq-mean-token-mean":
        row_means = masked.sum(dim=-1) / row_counts.clamp(min=1)
        return counts.share(row_means.sum(), "sequences", (row_counts > 0).sum())
    result = counts.share(masked.sum(), "rows", values.shape[0])
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        result = result / max_length
    return result


def token_mean(
    values: Tensor, mask: Tensor, counts: BatchCounts | None = None, key: str = "tokens"
) -> Tensor:
    """Detached mean of ``values`` over the masked tokens, as a micro-batch share (for metrics).

    Args:
        values (Tensor): [R, T].
        mask (Tensor): [R, T] bool, the tokens the mean runs over.
        counts: The mini-batch's denominators (None: this micro-batch's own).
        key: Which total of ``counts`` counts the masked tokens.
    """
    values = values.detach().float()
    mask = mask.bool()
    counts = counts if counts is not None else BatchCounts()
    masked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return counts.share(masked.sum(), key, mask.sum())


# --------------------------------------------------------------------------------------------
# Policy gradient
# --------------------------------------------------------------------------------------------


def _row_advantages(advantages: Tensor, logprobs: Tensor) -> Tensor:
    """Advantages as [R, 1] (per rollout) or [R, T] (per token), validated."""
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(
                f"advantages has shape {tuple(advantages.shape)} but logprobs has shape "
                f"{tuple(logprobs.shape)}; expected advantages [R] or [R, T]"
            )
        return advantages.unsqueeze(-1)
    check_same_shape(logprobs=logprobs, advantages=advantages)
    return advantages


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
    aggregation: str = "token-mean",
    counts: BatchCounts | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with dual clip, aggregated over response tokens.

    ``rho = exp(clamp(lp - lp_old, -20, 20))``,
    ``pg = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)``, and for ``A < 0``
    additionally ``pg = min(pg, -dual_clip * A)`` (bounds the loss of a very unlikely token
    with negative advantage). With ``weights`` (the rollout correction ``w``, see
    :func:`rollout_correction_weights`) each token's term is ``w * pg``; ``w`` is detached.

    Args:
        logprobs (Tensor): [R, T] ``lp^I`` under the current policy, with gradient.
        old_logprobs (Tensor): [R, T] ``lp_old`` under the rollout policy (no gradient used).
        advantages (Tensor): [R] per rollout (broadcast over tokens) or [R, T] per token.
        mask (Tensor): [R, T] bool response mask.
        eps_low: Lower clip range: ``rho >= 1 - eps_low``.
        eps_high: Upper clip range: ``rho <= 1 + eps_high``.
        dual_clip: Dual-clip constant ``c > 1`` for negative advantages; ``None`` disables it.
        aggregation: One of ``AGGREGATIONS``.
        counts: The mini-batch's denominators (None: this micro-batch is the mini-batch).
        weights (Tensor): [R, T] importance weights of the sampler/learner mismatch correction, or
            None (no correction).

    Non-finite inputs are not checked here (that would cost a device sync per tensor): they make the
    loss non-finite, and the training module skips that optimizer step.

    Returns:
        tuple[Tensor, dict[str, Tensor]]: the 0-dim loss, and detached 0-dim metrics (token
        means over the mask): ``clip_fraction`` (tokens where the clipped branch is the one
        used), ``dual_clip_fraction`` (tokens where the dual clip bound is the one used),
        ``ratio_mean``.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    adv = _row_advantages(advantages, logprobs)
    if aggregation == "micro-batch-token-mean" and counts is not None:
        counts = counts.local()

    ratio = torch.exp((logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = adv.detach()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(unclipped, clipped)
    metrics = {"clip_fraction": token_mean((clipped > unclipped).float(), mask, counts)}
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual_active = (adv < 0) & (pg > bound)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
        metrics["dual_clip_fraction"] = token_mean(dual_active.float(), mask, counts)
    else:
        metrics["dual_clip_fraction"] = torch.zeros((), device=logprobs.device)
    metrics["ratio_mean"] = token_mean(ratio, mask, counts)
    if weights is not None:
        check_same_shape(logprobs=logprobs, weights=weights)
        pg = pg * weights.detach()
    return masked_aggregate(pg, mask, aggregation, counts=counts), metrics


def rollout_correction_weights(
    old_logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    mode: str,
    cap: float = 2.0,
    band: tuple[float, float] = (0.5, 2.0),
) -> tuple[Tensor, Tensor]:
    """Importance weights that correct the policy gradient for sampling with another network.

    The rollouts were drawn from the sampler ``mu`` (vLLM: other kernels, often another dtype), while
    the clipped surrogate's ratio ``rho = pi / pi_old`` assumes they came from ``pi_old``. The weight
    ``w = pi_old / mu`` at the sampled tokens restores the expectation; it is truncated or masked to
    bound its variance, and it is detached (a constant of the loss, like the advantage):

    - ``"token_truncate"`` (token-level TIS): ``w_t = min(exp(lp_old_t - lp_mu_t), cap)``.
    - ``"token_mask"`` (token-level MIS): ``w_t = exp(lp_old_t - lp_mu_t)`` where it lies in
      ``[low, high]``, else 0 (the token leaves the policy gradient).
    - ``"sequence_truncate"``: one weight per response, the geometric mean of its token ratios,
      ``w = exp(mean_t (lp_old_t - lp_mu_t))``, truncated at ``cap``.
    - ``"sequence_mask"``: the same sequence weight, and the whole response is left out of the policy
      gradient when it lies outside ``[low, high]``.
    - ``"none"``: ``w = 1``.

    Log-ratios are clamped to ``[-20, 20]`` before ``exp``. A response without tokens has weight 1 and
    is never counted as changed; padding positions get weight 0.

    Args:
        old_logprobs (Tensor): [R, T] ``lp_old``, the policy before the update, at the sampled tokens.
        sampler_logprobs (Tensor): [R, T] ``lp_mu``, what the sampler reported for the same tokens.
        mask (Tensor): [R, T] bool response mask.
        mode: one of ``ROLLOUT_CORRECTIONS``.
        cap: truncation level of the ``*_truncate`` modes (``>= 1``: a matched token keeps weight 1).
        band: ``(low, high)`` kept by the ``*_mask`` modes (``low <= 1 <= high``).

    Returns:
        ``(weights, changed)``: [R, T] detached weights, and [R, T] bool, the response tokens whose
        weight the truncation or the mask changed (every token of a changed response).
    """
    check_same_shape(old_logprobs=old_logprobs, sampler_logprobs=sampler_logprobs, mask=mask)
    _check_choice("rollout_correction", mode, ROLLOUT_CORRECTIONS)
    mask = mask.bool()
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=old_logprobs.device)
    if mode == "none":
        return torch.where(mask, 1.0 + zero, zero), torch.zeros_like(mask)
    # Padding may hold anything (vLLM reports 0, a shifted test NaN): it never reaches a weight.
    log_ratio = torch.where(mask, old_logprobs.detach().to(dtype) - sampler_logprobs.detach().to(dtype), zero)
    if mode.startswith("sequence"):
        tokens = mask.sum(dim=-1, keepdim=True)
        log_ratio = (log_ratio.sum(dim=-1, keepdim=True) / tokens.clamp(min=1)).expand_as(log_ratio)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode.endswith("truncate"):
        changed = ratio > cap
        weights = ratio.clamp(max=cap)
    else:
        low, high = band
        changed = (ratio < low) | (ratio > high)
        weights = torch.where(changed, zero, ratio)
    return torch.where(mask, weights, zero), changed & mask


# --------------------------------------------------------------------------------------------
# CPPO: perception tokens and the Contrastive Perception Loss
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def perception_token_mask(
    entropy: Tensor,
    entropy_removed: Tensor,
    response_mask: Tensor,
    top_ratio: float = 0.5,
    advantages: Tensor | None = None,
) -> Tensor:
    """Perception tokens by entropy shift: the tokens that depend most on the image.

    ``dH = H^{I-} - H^I``; eligible tokens ``P_i = {t : dH > 0, response}``; key
    ``s = dH / (H^{I-} + 1e-6)``. Each row keeps its top ``k_i = max(1, floor(top_ratio *
    |P_i|))`` eligible tokens by ``s`` (every token tied with the k-th is kept, so a row can
    keep more than ``k_i``); a row without eligible tokens keeps none. The result is ANDed
    with the response mask and, when ``advantages`` is given, with ``A_i > 0`` (strict).
    Computed without gradient: the mask only selects. A NaN entropy makes its token ineligible.

    Args:
        entropy (Tensor): [R, T] full-vocab entropy under the original image ``I``.
        entropy_removed (Tensor): [R, T] entropy under the information-removing view ``I-``.
        response_mask (Tensor): [R, T] bool, True on response (non-padding) tokens.
        top_ratio: ``rho`` in (0, 1], fraction of eligible tokens kept per row.
        advantages (Tensor, optional): [R] advantages for gating; ``None`` disables gating.

    Returns:
        Tensor: [R, T] bool perception-token mask ``M``.
    """
    check_same_shape(entropy=entropy, entropy_removed=entropy_removed, response_mask=response_mask)
    _check_rank("entropy", entropy, 2, "[R, T]")
    entropy, entropy_removed = entropy.detach().float(), entropy_removed.detach().float()
    response = response_mask.bool()
    if entropy.shape[-1] == 0:
        return response.clone()

    shift = entropy_removed - entropy
    eligible = (shift > 0) & response
    key = torch.where(eligible, shift / (entropy_removed + PERCEPTION_EPS), float("-inf"))
    n_eligible = eligible.sum(dim=-1)
    k = torch.floor(n_eligible.double() * top_ratio).long().clamp(min=1)
    ranked = key.sort(dim=-1, descending=True).values
    threshold = ranked.gather(-1, (k - 1).unsqueeze(-1))
    # ``eligible`` already empties rows with |P_i| = 0 (their threshold is -inf).
    selected = eligible & (key >= threshold) & response
    if advantages is not None:
        if advantages.shape != entropy.shape[:1]:
            raise ValueError(
                f"advantages has shape {tuple(advantages.shape)} but entropy has shape "
                f"{tuple(entropy.shape)}; expected advantages [R]"
            )
        selected &= (advantages.detach() > 0).unsqueeze(-1)
    return selected


def contrastive_perception_loss(
    logprobs: Tensor,
    logprobs_preserving: Tensor,
    logprobs_removing: Tensor,
    mask: Tensor,
    tau: float = 0.1,
    divergence: str = "k3",
    counts: BatchCounts | None = None,
    count_key: str = "perception",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Contrastive Perception Loss (CPL): InfoNCE with similarity ``-KL``.

    ``D+ = KL(pi(.|I) || pi(.|I+))``, ``D- = KL(pi(.|I) || pi(.|I-))``,
    ``cpl = softplus((D+ - D-) / tau)``, ``L = sum(M * cpl) / max(sum(M), 1)``. Pulls the
    information-preserving view towards the original and pushes the information-removing view
    away. All three inputs receive gradient (no stop-gradient on any branch, as in the
    release). ``L`` is 0 when ``M`` selects nothing and stays connected to the graph. The divergences
    are the k3 estimates at the sampled tokens; for the exact full-vocabulary KL (the ``full_kl``
    ablation) pass ``full_kl`` of the log-distributions to
    :func:`contrastive_perception_loss_from_divergences` (the update computes them chunk by chunk).

    Args:
        logprobs (Tensor): ``lp^I``: [R, T] sampled-token log-probs.
        logprobs_preserving (Tensor): ``lp^{I+}``, same shape.
        logprobs_removing (Tensor): ``lp^{I-}``, same shape.
        mask (Tensor): [R, T] bool perception-token mask ``M``.
        tau: Temperature, positive.
        divergence: ``"k3"`` (the only one here; ``"full_kl"`` is an error naming the function above).
        counts: The mini-batch's denominators; ``sum(M)`` is then the mini-batch's count
            ``counts.totals[count_key]`` (None: this call's own mask).
        count_key: Which total counts the selected tokens.

    Returns:
        tuple[Tensor, dict[str, Tensor]]: the 0-dim loss, and detached 0-dim metrics (means over
        ``M``, 0 when empty): ``cpl``, ``divergence_preserving``, ``divergence_removing``,
        ``cpl_direction``.
    """
    if divergence == "full_kl":
        raise ValueError(
            "contrastive_perception_loss takes sampled-token log-probs (k3); for the exact KL pass "
            "full_kl(lp, lp_plus) and full_kl(lp, lp_minus) to contrastive_perception_loss_from_divergences"
        )
    _check_choice("divergence", divergence, ("k3",))
    check_same_shape(
        logprobs=logprobs,
        logprobs_preserving=logprobs_preserving,
        logprobs_removing=logprobs_removing,
        mask=mask,
    )
    d_plus = k3_kl(logprobs, logprobs_preserving)
    d_minus = k3_kl(logprobs, logprobs_removing)
    return contrastive_perception_loss_from_divergences(d_plus, d_minus, mask, tau, counts, count_key)


def contrastive_perception_loss_from_divergences(
    divergence_preserving: Tensor,
    divergence_removing: Tensor,
    mask: Tensor,
    tau: float = 0.1,
    counts: BatchCounts | None = None,
    count_key: str = "perception",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The CPL from per-token divergences ``D+`` and ``D-`` (see :func:`contrastive_perception_loss`).

    Args:
        divergence_preserving (Tensor): [R, T] ``D+`` (with gradient).
        divergence_removing (Tensor): [R, T] ``D-`` (with gradient).
        mask (Tensor): [R, T] bool perception-token mask ``M``.
        tau: Temperature, positive.
        counts: The mini-batch's denominators (None: this call's own mask).
        count_key: Which total counts the selected tokens.

    Returns:
        tuple[Tensor, dict[str, Tensor]]: the 0-dim loss and the metrics ``cpl``,
        ``divergence_preserving``, ``divergence_removing`` and ``cpl_direction`` (the fraction of
        ``M`` with ``D+ < D-``).
    """
    check_same_shape(
        divergence_preserving=divergence_preserving, divergence_removing=divergence_removing, mask=mask
    )
    counts = counts if counts is not None else BatchCounts()
    mask = mask.bool()
    cpl = F.softplus((divergence_preserving - divergence_removing) / tau)
    selected = torch.where(mask, cpl, torch.zeros((), dtype=cpl.dtype, device=cpl.device))
    selected_count = mask.sum()
    loss = counts.share(selected.sum(), count_key, selected_count)
    metrics = {
        "cpl": token_mean(cpl, mask, counts, count_key),
        "divergence_preserving": token_mean(divergence_preserving, mask, counts, count_key),
        "divergence_removing": token_mean(divergence_removing, mask, counts, count_key),
        # The CPL's direction: on the share of perception tokens with D+ < D- it already agrees with
        # the views; below 0.5 the views disagree with the loss (I+ moves the outputs more than I-).
        # Ties count half: D+ = D- (in practice both 0, a token certain under every view) carries no
        # gradient (k3's vanishes there) and says nothing about the direction; counted as "wrong", a
        # confident policy would look misdirected whatever its pools.
        "cpl_direction": token_mean(
            cpl_direction_indicator(divergence_preserving, divergence_removing), mask, counts, count_key
        ),
    }
    return loss, metrics


def cpl_direction_indicator(divergence_preserving: Tensor, divergence_removing: Tensor) -> Tensor:
    """Per token, whether the views agree with the CPL: 1 where ``D+ < D-``, 0.5 on a tie, 0 where ``D+ > D-``.

    Its mean over the perception tokens is the CPL's direction (``cpl_direction``; 0.5 = no signal).

    Args:
        divergence_preserving (Tensor): [...] ``D+``.
        divergence_removing (Tensor): [...] ``D-`` (same shape).

    Returns:
        Tensor: [...] float values in {0, 0.5, 1}.
    """
    less = (divergence_preserving < divergence_removing).to(divergence_preserving.dtype)
    tie = (divergence_preserving == divergence_removing).to(divergence_preserving.dtype)
    return less + 0.5 * tie


# --------------------------------------------------------------------------------------------
# PAPO baseline
# --------------------------------------------------------------------------------------------


def implicit_perception_loss(
    logprobs: Tensor,
    masked_logprobs: Tensor,
    mask: Tensor,
    aggregation: str = "token-mean",
    counts: BatchCounts | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PAPO's implicit perception loss: ``-aggregate(k3(lp^I, lp^{Imask}))``.

    Minimising it maximises the divergence between the policy on the original image and on
    the patch-blackened image, i.e. rewards depending on the image. Whether ``masked_logprobs``
    carries gradient is the caller's choice (PAPO's default: pre-update policy, no gradient).

    Args:
        logprobs (Tensor): [R, T] ``lp^I`` with gradient.
        masked_logprobs (Tensor): [R, T] log-probs of the same tokens under the masked image.
        mask (Tensor): [R, T] bool response mask.
        aggregation: One of ``AGGREGATIONS``.
        counts: The mini-batch's denominators (None: this micro-batch is the mini-batch).

    Returns:
        tuple[Tensor, dict[str, Tensor]]: the 0-dim loss (to be minimised, weighted by
        ``gamma``), and ``{"implicit_perception_loss": loss.detach()}``.
    """
    check_same_shape(logprobs=logprobs, masked_logprobs=masked_logprobs, mask=mask)
    loss = -masked_aggregate(k3_kl(logprobs, masked_logprobs), mask, aggregation, counts=counts)
    return loss, {"implicit_perception_loss": loss.detach()}


def double_entropy_loss(
    logprobs: Tensor,
    masked_logprobs: Tensor,
    mask: Tensor,
    eta_original: float,
    eta_masked: float,
    counts: BatchCounts | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PAPO's double entropy regulariser with the sampled-token NLL as entropy estimate.

    ``eta_original * mean(-lp^I) + eta_masked * mean(-lp^{Imask})``, token means over the
    mask. Added to the loss, it keeps both entropies from blowing up while the implicit
    perception loss pushes the two views apart.

    Args:
        logprobs (Tensor): [R, T] ``lp^I``.
        masked_logprobs (Tensor): [R, T] ``lp^{Imask}``.
        mask (Tensor): [R, T] bool response mask.
        eta_original: Weight of the entropy under the original image.
        eta_masked: Weight of the entropy under the masked image.
        counts: The mini-batch's denominators (None: this micro-batch is the mini-batch).

    Returns:
        tuple[Tensor, dict[str, Tensor]]: the 0-dim loss and ``{"double_entropy": loss.detach()}``.
    """
    check_same_shape(logprobs=logprobs, masked_logprobs=masked_logprobs, mask=mask)
    loss = eta_original * masked_aggregate(-logprobs, mask, counts=counts) + eta_masked * masked_aggregate(
        -masked_logprobs, mask, counts=counts
    )
    return loss, {"double_entropy": loss.detach()}
