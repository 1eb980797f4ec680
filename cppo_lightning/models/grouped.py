"""The grouped (shared-prefix) forward: each prompt computed once for all the completions that follow it.

The ``G`` rollouts of one prompt share its tokens and its image: in one row per rollout, the vision tower
and the prompt's tokens run ``G`` times per view and per pass of the update, about half of the update's
work at real shapes (a VLM prompt holds hundreds of image tokens). Here the rows of one prompt and one
image view become one **segment** of a flat sequence::

    [prompt ; completion_1 ; ... ; completion_k]

in which each completion attends to the whole prompt and causally to itself, never to a sibling. Every
token-wise layer (embeddings, MLPs, norms, projections: most of the compute) sees the prompt once; the
image is encoded once per segment. Position ids are those of the unpacked row: completion ``i`` continues
from the prompt's end (Qwen's 3-D M-RoPE included, from the model's own ``get_rope_index``).

**How attention is grouped.** Through transformers' attention interface: the language model's attention
implementation is replaced once by a wrapper (:func:`enable_grouped_attention`) that calls the
original implementation unless the forward carries a :class:`PrefixGroups` layout in its keyword
arguments (transformers 5 hands a forward's extra keyword arguments to every attention call). With a
layout it runs two dense SDPA calls per layer instead of one ``[L, L]`` mask over ``L = P + k * C``
tokens (whose cost grows with ``k^2``):

- the prompts, padded to the longest one: ``[S, H, P, D]`` against themselves (causal, with the model's
  own rules: Gemma 3's image tokens see each other both ways, sliding windows);
- the completions, padded to the longest one: ``[N, H, C, D]`` against ``[their prompt ; themselves]``,
  ``[N, H, P + C, D]``.

So attention costs the prompt once plus each completion against its prompt and itself, as in
PrefixGrouper, on any device SDPA runs on (the memory-efficient kernel takes the boolean masks on GPUs).
The layout travels as a keyword argument, not as global state, so gradient checkpointing recomputes a
layer with the same grouping (its saved keyword arguments include the layout); the wrapper stays
installed for that reason, and without a layout it is the original implementation, call for call.

Architectures whose decoder carries state along the sequence other than attention (Qwen3.5's Gated
DeltaNet layers: a recurrent state over every previous token, siblings included) cannot be grouped this
way: :func:`grouping_refusal` says why and the scorer keeps one row per rollout for them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention

from cppo_lightning.architectures import architecture_of

log = logging.getLogger(__name__)

#: The keyword argument a grouped forward hands to every attention call.
GROUPS_KWARG = "cppo_prefix_groups"
#: Prefix of the wrapped attention implementations' names in transformers' registries.
IMPLEMENTATION_PREFIX = "cppo_grouped_"


# ---------------------------------------------------------------------------------------------- layout


@dataclass
class Segment:
    """One prompt under one image view and the completions scored after it.

    Attributes:
        prompt: the prompt's token-axis inputs without padding, each ``[P]`` (``input_ids``, and the
            architecture's extra keys such as ``mm_token_type_ids``).
        completions: each completion's input tokens, ``[C_i - 1]`` (the last token of a completion is
            predicted, never fed).
        image_blocks: ``[P]`` image block of each prompt token (-1: not an image token) when image tokens
            attend to each other both ways (Gemma 3); None: causal everywhere.
    """

    prompt: dict[str, Tensor]
    completions: list[Tensor]
    image_blocks: Tensor | None = None

    @property
    def prompt_length(self) -> int:
        return int(self.prompt["input_ids"].shape[0])

    @classmethod
    def of(cls, prompt: Mapping[str, Tensor], completions: Sequence[Tensor], model: nn.Module) -> Segment:
        """A segment of ``model``'s family: image blocks from ``token_type_ids`` where the family's image
        tokens attend both ways (Gemma 3: each run of image tokens is one block)."""
        prompt = dict(prompt)
        blocks = None
        if architecture_of(model).bidirectional_image_attention and "token_type_ids" in prompt:
            is_image = prompt["token_type_ids"] == 1
            starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
            blocks = torch.where(is_image, starts.long().cumsum(0) - 1, -1).cpu()
        return cls(prompt, list(completions), blocks)


@dataclass
class PrefixGroups:
    """Where each token of a grouped forward sits, and the attention masks that follow from it.

    The flat sequence holds the segments one after another: a segment's prompt tokens, then its
    completions' tokens. Padded index tensors gather the prompts (``[S, P]``) and the completions
    (``[N, C]``) out of it for attention; padding slots point at token 0 and are masked.

    Attributes:
        total: tokens of the flat sequence.
        prompt_index: [S, P] flat index of each prompt token.
        prompt_valid: [S, P] bool.
        prompt_lengths: [S] tokens of each prompt.
        image_blocks: [S, P] image block of each prompt token (-1: none), or None.
        completion_index: [N, C] flat index of each completion's input tokens.
        completion_valid: [N, C] bool.
        completion_segment: [N] segment of each completion.
        last_prompt_token: [S] flat index of each prompt's last token (its state predicts every
            completion's first token).
    """

    total: int
    prompt_index: Tensor
    prompt_valid: Tensor
    prompt_lengths: Tensor
    image_blocks: Tensor | None
    completion_index: Tensor
    completion_valid: Tensor
    completion_segment: Tensor
    last_prompt_token: Tensor
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, segments: Sequence[Segment], device: torch.device) -> PrefixGroups:
        """The layout of ``segments`` laid one after another."""
        prompt_lengths = [segment.prompt_length for segment in segments]
        completion_lengths = [int(c.shape[0]) for segment in segments for c in segment.completions]
        width_p = max(prompt_lengths)
        width_c = max([0, *completion_lengths])
        prompt_index = torch.zeros(len(segments), width_p, dtype=torch.long)
        prompt_valid = torch.zeros(len(segments), width_p, dtype=torch.bool)
        completion_index = torch.zeros(len(completion_lengths), width_c, dtype=torch.long)
        completion_valid = torch.zeros(len(completion_lengths), width_c, dtype=torch.bool)
        completion_segment = []
        blocks = None
        if any(segment.image_blocks is not None for segment in segments):
            blocks = torch.full((len(segments), width_p), -1, dtype=torch.long)
        start, number = 0, 0
        for s, segment in enumerate(segments):
            length = prompt_lengths[s]
            prompt_index[s, :length] = torch.arange(start, start + length)
            prompt_valid[s, :length] = True
            if blocks is not None and segment.image_blocks is not None:
                blocks[s, :length] = segment.image_blocks
            start += length
            for completion in segment.completions:
                n = int(completion.shape[0])
                completion_index[number, :n] = torch.arange(start, start + n)
                completion_valid[number, :n] = True
                completion_segment.append(s)
                start += n
                number += 1
        # Each prompt's last token: its first flat index plus its length, minus one.
        last = prompt_index[:, 0] + torch.tensor(prompt_lengths) - 1
        to = functools.partial(torch.Tensor.to, device=device)
        return cls(
            total=start,
            prompt_index=to(prompt_index),
            prompt_valid=to(prompt_valid),
            prompt_lengths=to(torch.tensor(prompt_lengths)),
            image_blocks=None if blocks is None else to(blocks),
            completion_index=to(completion_index),
            completion_valid=to(completion_valid),
            completion_segment=to(torch.tensor(completion_segment, dtype=torch.long)),
            last_prompt_token=to(last),
        )

    def masks(self, sliding_window: int | None) -> tuple[Tensor, Tensor]:
        """``([S, 1, P, P], [N, 1, C, P + C])`` boolean masks (True: attend), cached per window.

        The rules of the unpacked row: causal by sequence index; image tokens of one block both ways
        (when ``image_blocks`` is set, as Gemma 3 builds its mask: OR(causal, block), then AND(window));
        a sliding window keeps keys with ``index > query index - window``. A padding query attends to
        itself only (its output is discarded, and a row with nothing to attend to would be NaN).
        """
        if sliding_window in self._masks:
            return self._masks[sliding_window]
        device = self.prompt_index.device
        width_p, width_c = self.prompt_index.shape[1], self.completion_index.shape[1]
        i = torch.arange(width_p, device=device)
        allowed = i[None, :] <= i[:, None]  # [P, P] key <= query
        allowed = allowed.expand(len(self.prompt_index), -1, -1)
        if self.image_blocks is not None:
            blocks = self.image_blocks
            same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
            allowed = allowed | same
        if sliding_window:
            allowed = allowed & (i[None, :] > i[:, None] - sliding_window)
        eye = torch.eye(width_p, dtype=torch.bool, device=device)
        prompt = (allowed & self.prompt_valid[:, None, :]) | (~self.prompt_valid[:, :, None] & eye)

        t = torch.arange(width_c, device=device)
        valid_p = self.prompt_valid[self.completion_segment]  # [N, P]
        to_prompt = valid_p[:, None, :].expand(-1, width_c, -1)  # [N, C, P]
        if sliding_window:
            query = self.prompt_lengths[self.completion_segment][:, None] + t[None, :]  # [N, C]
            to_prompt = to_prompt & (i[None, None, :] > query[:, :, None] - sliding_window)
        own = (t[None, :] <= t[:, None])[None] & self.completion_valid[:, None, :]  # [N, C, C]
        if sliding_window:
            own = own & (t[None, None, :] > t[None, :, None] - sliding_window)
        eye_c = torch.eye(width_c, dtype=torch.bool, device=device)
        own = own | (~self.completion_valid[:, :, None] & eye_c)
        completion = torch.cat([to_prompt, own], dim=-1)
        masks = (prompt[:, None], completion[:, None])
        self._masks[sliding_window] = masks
        return masks

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_valid.sum())


# ---------------------------------------------------------------------------------------------- attention


def grouped_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    groups: PrefixGroups,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **_: object,
) -> Tensor:
    """Attention over a grouped flat sequence: the prompts against themselves, each completion against
    its prompt and itself.

    Args:
        module: the attention module (unused; part of transformers' interface).
        query (Tensor): [1, H, T, D] after the rotary embedding.
        key (Tensor): [1, H_kv, T, D].
        value (Tensor): [1, H_kv, T, D].
        groups: the layout of the ``T`` tokens.

    Returns:
        Tensor: [1, T, H, D], as transformers' attention functions return it.
    """
    if softcap is not None:
        raise NotImplementedError("grouped attention does not implement attention logit soft-capping")
    if query.shape[0] != 1:
        raise ValueError(f"a grouped forward is one flat sequence, got a batch of {query.shape[0]}")
    heads, kv_heads = query.shape[1], key.shape[1]
    gqa = heads != kv_heads
    q, k, v = query[0], key[0], value[0]  # [H, T, D]
    prompt_mask, completion_mask = groups.masks(sliding_window)
    dropout = dropout if module.training else 0.0

    def gather(x: Tensor, index: Tensor) -> Tensor:  # [H, T, D] -> [rows, H, width, D]
        return x[:, index].transpose(0, 1)

    kp, vp = gather(k, groups.prompt_index), gather(v, groups.prompt_index)
    out_p = scaled_dot_product_attention(
        gather(q, groups.prompt_index),
        kp,
        vp,
        attn_mask=prompt_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=gqa,
    )  # [S, H, P, D]
    out = query.new_zeros(query.shape[2], heads, query.shape[3])
    out = out.index_put(
        (groups.prompt_index[groups.prompt_valid],), out_p.transpose(1, 2)[groups.prompt_valid]
    )
    if groups.completion_index.numel():
        segment = groups.completion_segment
        kc = torch.cat([kp[segment], gather(k, groups.completion_index)], dim=2)
        vc = torch.cat([vp[segment], gather(v, groups.completion_index)], dim=2)
        out_c = scaled_dot_product_attention(
            gather(q, groups.completion_index),
            kc,
            vc,
            attn_mask=completion_mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=gqa,
        )  # [N, H, C, D]
        valid = groups.completion_valid
        out = out.index_put((groups.completion_index[valid],), out_c.transpose(1, 2)[valid])
    return out.unsqueeze(0)


def _wrapped(original: str):
    """The attention function registered as ``cppo_grouped_<original>``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        groups = kwargs.pop(GROUPS_KWARG, None)
        if groups is not None:
            return grouped_attention(module, query, key, value, groups, **kwargs), None
        if original == "eager":  # each modeling file has its own eager function
            delegate = sys.modules[type(module).__module__].eager_attention_forward
        else:
            delegate = ALL_ATTENTION_FUNCTIONS[original]
        return delegate(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{IMPLEMENTATION_PREFIX}{original}"
    return attention


def _register(original: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"{IMPLEMENTATION_PREFIX}{original}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _wrapped(original))
        if original in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            # Without a layout the wrapper is the original: its masks are the original's.
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def language_model_of(model: nn.Module) -> nn.Module | None:
    """The decoder stack of a VLM (PEFT wrappers seen through), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, "model", None)
    if backbone is None:
        return None
    entry = architecture_of(base)
    for name in (entry.language_model, "language_model", "text_model"):
        found = getattr(backbone, name, None)
        if isinstance(found, nn.Module):
            return found
    return None


def grouping_refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot run the grouped forward (None: it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    entry = architecture_of(base)
    if entry.generic:
        return f"model type {entry.model_type!r} is not in the architecture table (grouping is tested per family)"
    if entry.shared_prefix_refusal:
        return entry.shared_prefix_refusal
    language = language_model_of(base)
    if language is None:
        return f"{entry.name}: no language model found under the backbone"
    config = getattr(language, "config", None)
    types = set(getattr(config, "layer_types", None) or ())
    if types - {"full_attention", "sliding_attention"}:
        return f"{entry.name}: decoder layers of types {sorted(types)} carry state along the sequence"
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if "flash" in implementation or "paged" in implementation:
        return f"{entry.name}: attention implementation {implementation!r} is not wrapped (use sdpa or eager)"
    return None


def enable_grouped_attention(model: nn.Module) -> bool:
    """Install the grouped-attention wrapper in ``model``'s language model (idempotent).

    Returns:
        bool: whether ``model`` can now run :func:`grouped_hidden_states` (see :func:`grouping_refusal`).
    """
    language = language_model_of(model)
    config = getattr(language, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current and current.startswith(IMPLEMENTATION_PREFIX):
        return True
    reason = grouping_refusal(model)
    if reason is not None:
        return False
    config._attn_implementation = _register(current or "eager")
    return True


# ---------------------------------------------------------------------------------------------- the forward


def segment_positions(backbone: nn.Module, segments: Sequence[Segment], vision: Sequence[Mapping]) -> Tensor:
    """Position ids of a grouped forward's flat sequence, those of each unpacked row.

    Models with 3-D M-RoPE (``get_rope_index``: the Qwen VL families) get their prompts' positions from
    the model's own function, and each completion continues from the prompt's largest position + 1 on all
    three axes, as text after an image does; other models count tokens from 0 per row (RoPE depends on
    differences of positions only, so the left padding of the unpacked rows changes nothing).

    Returns:
        Tensor: ``[3, 1, T]`` (M-RoPE) or ``[1, T]``.
    """
    rope_index = getattr(backbone, "get_rope_index", None)
    pieces = []
    for segment, images in zip(segments, vision):
        length = segment.prompt_length
        if rope_index is None:
            prompt = torch.arange(length)[None]
            nxt = length
        else:
            accepted = set(inspect.signature(rope_index).parameters)
            kwargs = {key: value[None] for key, value in segment.prompt.items() if key in accepted}
            kwargs.update({key: value for key, value in images.items() if key in accepted})
            kwargs["attention_mask"] = torch.ones_like(segment.prompt["input_ids"])[None]
            prompt = rope_index(**kwargs)[0][:, 0].cpu()  # [3, P]
            nxt = int(prompt.max()) + 1
        pieces.append(prompt)
        for completion in segment.completions:
            steps = torch.arange(nxt, nxt + int(completion.shape[0]))
            pieces.append(steps[None] if rope_index is None else steps[None].expand(3, -1))
    positions = torch.cat(pieces, dim=-1)
    return positions[:, None] if rope_index is not None else positions


def grouped_hidden_states(
    model: nn.Module,
    segments: Sequence[Segment],
    vision: Sequence[Mapping[str, Tensor]] | None,
    encoder_outputs: object | None = None,
) -> tuple[Tensor, PrefixGroups]:
    """Last hidden states of a grouped forward.

    Args:
        model: the VLM (or its PEFT wrapper), with :func:`enable_grouped_attention` applied.
        segments: the prompts and their completions.
        vision: each segment's vision inputs (the processor's, one image each), in order; the ``pixel_*``
            ones are left out when ``encoder_outputs`` is given.
        encoder_outputs: the image encoder's outputs for the segments' images, in order (see
            :class:`cppo_lightning.models.vision_cache.VisionCache`); None: encode the images here.

    Returns:
        ``(hidden [T, H], layout)``: the flat sequence's last hidden states and its layout.
    """
    from cppo_lightning.batch import concat_vision_inputs
    from cppo_lightning.models.scoring import LanguageModelHead

    backbone = LanguageModelHead.of(model).backbone
    device = next(model.parameters()).device
    groups = PrefixGroups.of(segments, device)
    keys = list(segments[0].prompt)
    inputs = {}
    for key in keys:
        pieces = []
        for segment in segments:
            pieces.append(segment.prompt[key])
            fill = (lambda c: c) if key == "input_ids" else torch.zeros_like
            pieces.extend(fill(completion) for completion in segment.completions)
        inputs[key] = torch.cat(pieces)[None].to(device)
    batched = concat_vision_inputs(list(vision))
    if encoder_outputs is not None:
        batched = {key: value for key, value in batched.items() if not key.startswith("pixel_")}
        inputs["mm_encoder_outputs"] = {"image": encoder_outputs}
    inputs.update(batched)
    inputs["position_ids"] = segment_positions(backbone, segments, vision).to(device)
    # A prepared 4-D mask makes transformers skip building one (an [T, T] mask would be quadratic in the
    # group size); the grouped attention builds its own from the layout.
    inputs["attention_mask"] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    hidden = backbone(**inputs, use_cache=False, **{GROUPS_KWARG: groups})[0]
    return hidden[0], groups


__all__ = [
    "GROUPS_KWARG",
    "PrefixGroups",
    "Segment",
    "enable_grouped_attention",
    "grouped_attention",
    "grouped_hidden_states",
    "grouping_refusal",
    "language_model_of",
    "segment_positions",
]
