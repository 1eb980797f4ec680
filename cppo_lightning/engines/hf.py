"""Sampling with Hugging Face ``generate`` on the trained policy itself (the default engine)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from cppo_lightning.batch import ORIGINAL, PromptBatch
from cppo_lightning.engines.base import Generation, eos_and_pad
from cppo_lightning.models.loading import Policy
from cppo_lightning.models.scoring import LanguageModelHead, completion_mask
from cppo_lightning.sampling import EvaluationSampling, RolloutConfig
from cppo_lightning.sharding import run_gathered


class HFEngine:
    """``policy.model.generate`` on the original view, one row per rollout.

    The sampler is the trained network, so nothing needs syncing and ``lp_old == lp.detach()`` holds
    exactly with one optimizer step per rollout batch. Sampling draws from torch's global generator,
    which the module seeds per step and rank; ``seed`` is therefore not used. A call whose rows are runs
    of one prompt each (``G`` rollouts per prompt) passes each prompt once with
    ``num_return_sequences``: ``generate`` encodes its image and prefills it once, then samples the
    same completions as repeated rows would (tested).

    Args:
        synced_gpus: whether every rank must run the same number of decoding steps (sharded
            strategies: FSDP, DeepSpeed); a callable is asked at every call.
        report_logprobs: fill ``Generation.sampler_logprobs`` for sampled rows (temperature > 0): the
            log-prob of each sampled training token under ``softmax(logits / temperature)``, as the update scores
            it (see :class:`SampledTokenLogprobs`). They equal the policy's to float rounding; the module
            asks for them for ``update.old_logprobs: sampler`` and the rollout correction.
    """

    samples_from_policy = True

    def __init__(self, synced_gpus: bool | Callable[[], bool] = False, report_logprobs: bool = False) -> None:
        self.synced_gpus = synced_gpus
        self.reports_logprobs = report_logprobs

    def generate(
        self, policy: Policy, batch: PromptBatch, example_rows: Tensor, config: RolloutConfig, seed: int
    ) -> Generation:
        """See :meth:`cppo_lightning.engines.RolloutEngine.generate` (``sampler_logprobs`` is None)."""
        eos, pad = eos_and_pad(policy)
        synced = self.synced_gpus() if callable(self.synced_gpus) else self.synced_gpus
        # Rows in calls of at most `generation_rollouts` (the KV cache grows with the rows decoded at once).
        step = config.generation_rollouts or max(1, len(example_rows))
        calls = -(-max(1, len(example_rows)) // step)
        if synced:
            # Under synced_gpus every call's decoding steps are collectives: each rank must make as many
            # calls, also when a rank holds fewer rows (its extra calls decode a row again, discarded).
            calls = most_calls(calls, next(policy.model.parameters()).device)
        parts = []
        # Training rollouts only: validation and test read no log-probs.
        report = (
            self.reports_logprobs and config.temperature > 0 and not isinstance(config, EvaluationSampling)
        )
        with sampling_mode(policy.model):
            for call in range(calls):
                start = call * step
                rows = example_rows[start : start + step] if start < len(example_rows) else example_rows[-1:]
                prompts, samples = prompt_runs(rows)
                recorder = SampledTokenLogprobs(policy.model, config.temperature) if report else None
                # Under FSDP2 the root unit (embeddings, head) is gathered once per call, the layers at
                # every decoding step (synced_gpus keeps the ranks in step).
                with recorder.recording() if recorder is not None else nullcontext():
                    generated = run_gathered(
                        policy.model,
                        generate,
                        policy.model,
                        batch.model_inputs(ORIGINAL, prompts),
                        config,
                        eos,
                        pad,
                        synced_gpus=synced,
                        samples=samples,
                        logits_processor=[recorder] if recorder is not None else None,
                    )
                if recorder is not None:
                    generated = (*generated, recorder.logprobs(*generated))
                if start < len(example_rows) or not parts:
                    parts.append(generated)
        width = max(part[0].shape[1] for part in parts)
        completion = torch.cat([pad_right(part[0], width, pad) for part in parts])
        mask = torch.cat([pad_right(part[1], width, False) for part in parts])
        logprobs = torch.cat([pad_right(part[2], width, 0.0) for part in parts]) if report else None
        return Generation(completion_ids=completion, completion_mask=mask, sampler_logprobs=logprobs)

    def sync(self, policy: Policy) -> None:
        """Nothing to do: the sampler is the policy."""


@contextmanager
def sampling_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradient for ``generate``; the previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    config: RolloutConfig,
    eos_token_ids: list[int],
    pad_token_id: int,
    synced_gpus: bool = False,
    samples: int = 1,
    logits_processor: list | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample ``samples`` completions per input row (consecutive rows of the output).

    ``generate`` encodes each row's image and prefills its prompt once, then expands the batch ``samples``
    times: the same completions as ``samples`` repeated input rows, at a fraction of the prefill.
    ``logits_processor``: transformers logits processors run at every decoding step, after the
    generation config's own and before the sampling warpers (temperature, top-k, top-p).

    Returns:
        ``(completion_ids [R, C], completion_mask [R, C])``.
    """
    sampling = config.temperature > 0
    kwargs = dict(do_sample=sampling, max_new_tokens=config.max_new_tokens, use_cache=True)
    if config.min_new_tokens:
        kwargs["min_new_tokens"] = config.min_new_tokens
    if sampling:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    if samples > 1 and sampling:
        kwargs["num_return_sequences"] = samples
    if logits_processor:
        kwargs["logits_processor"] = LogitsProcessorList(logits_processor)
    sequences = model.generate(
        **inputs, eos_token_id=eos_token_ids, pad_token_id=pad_token_id, synced_gpus=synced_gpus, **kwargs
    )
    if samples > 1 and not sampling:  # greedy: the samples of a prompt are one completion, decoded once
        sequences = sequences.repeat_interleave(samples, dim=0)
    completion = sequences[:, inputs["input_ids"].shape[1] :]
    return completion, completion_mask(completion, eos_token_ids)


class SampledTokenLogprobs(LogitsProcessor):
    """Records the log-prob of every sampled token, as the update scores it, during ``generate``.

    A forward hook on the output head keeps the logits of each decoding step (before any logits
    processor: the generation config's suppressed tokens and ``min_new_tokens``' EOS mask are not
    applied, nor are top-k and top-p). Called as a logits processor once per decoding step, it turns them
    into ``log_softmax(logits / temperature)``; the token sampled at step ``t`` is the last input id at
    step ``t + 1``, where its log-prob is read. One ``[rows, vocabulary]`` step is held at a time.

    Args:
        model: the policy network ``generate`` runs.
        temperature: the sampling temperature.
    """

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        self.head = LanguageModelHead.of(model)
        self.temperature = temperature
        self.steps: list[Tensor] = []
        self._logits: Tensor | None = None
        self._last: Tensor | None = None

    @contextmanager
    def recording(self) -> Iterator[SampledTokenLogprobs]:
        """Hook the output head while ``generate`` runs."""
        handle = self.head.head.register_forward_hook(self._keep)
        try:
            yield self
        finally:
            handle.remove()

    def _keep(self, module: torch.nn.Module, args, output: Tensor) -> None:
        self._logits = output[:, -1]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._last is not None:
            self.steps.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        logits = self.head.finish(self._logits) / self.temperature
        self._last = torch.log_softmax(logits, dim=-1)
        return scores

    def logprobs(self, completion: Tensor, mask: Tensor) -> Tensor:
        """[R, C] float32 log-probs of ``completion``'s tokens (0 after each row's end)."""
        steps = list(self.steps)
        if self._last is not None and len(steps) < completion.shape[1]:  # the last step's token
            steps.append(self._last.gather(1, completion[:, len(steps) : len(steps) + 1]).squeeze(1))
        if len(steps) != completion.shape[1]:
            raise RuntimeError(
                f"recorded {len(steps)} decoding steps for {completion.shape[1]} completion tokens"
            )
        values = torch.stack(steps, dim=1).float()
        return values.masked_fill(~mask.bool(), 0.0)


def prompt_runs(rows: Tensor) -> tuple[Tensor, int]:
    """``(prompts, k)`` when ``rows`` is runs of ``k`` equal prompts each, else ``(rows, 1)``."""
    values = rows.tolist()
    changes = [i for i in range(1, len(values)) if values[i] != values[i - 1]]
    starts = [0, *changes]
    lengths = {end - begin for begin, end in zip(starts, [*changes, len(values)])}
    if len(lengths) != 1 or len(set(values)) != len(starts):
        return rows, 1
    return rows[starts], lengths.pop()


def pad_right(tensor: Tensor, width: int, value: int | bool) -> Tensor:
    """``[R, C]`` padded on the right with ``value`` to ``[R, width]``."""
    if tensor.shape[1] == width:
        return tensor
    padding = tensor.new_full((tensor.shape[0], width - tensor.shape[1]), value)
    return torch.cat([tensor, padding], dim=1)


def most_calls(calls: int, device: torch.device) -> int:
    """The largest number of ``generate`` calls of any rank (``calls`` itself outside distributed runs)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return calls
    count = torch.tensor([calls], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())
