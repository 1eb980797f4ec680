"""Tiny vision-language models built offline, from configs only.

Tests, the CPU demo and real checkpoints all load through ``from_pretrained``: these builders create a
randomly initialised model of a real architecture (Qwen2.5-VL or LLaVA), a byte-level BPE tokenizer
trained in memory on a small corpus, a Qwen-style chat template and the matching image processor, and
write everything with ``save_pretrained`` to a folder. Nothing is downloaded.

A folder can also be named by a ``tiny:`` spec wherever a model name is accepted, e.g.
``tiny:qwen2_5_vl-smoke`` or ``tiny:llava-demo@seed=3``: it is built once into the cache folder
(``$CPPO_CACHE`` or ``~/.cache/cppo_lightning``) and then loaded like any checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHITECTURES = ("qwen2_5_vl", "llava")

# Structural tokens. Qwen's names are kept for both architectures so one chat template serves both.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
LLAVA_IMAGE = "<image>"

_QWEN_SPECIALS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
_LLAVA_SPECIALS = [ENDOFTEXT, IM_START, IM_END, LLAVA_IMAGE]

# Qwen-style chat template. Content is either a string or a list of {"type": "image"|"text"} parts.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}__IMAGE__{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# What the tokenizer is trained on: the words of the synthetic perception task, the reasoning format and
# digits. Byte-level BPE still encodes any text; this only makes the common words short.
_CORPUS = [
    "How many red shapes are in the image? How many blue circles are there?",
    "What colour is the triangle? What color is the square? Is there a green star?",
    "Is the yellow circle to the left of the purple square? Is it above or below? Answer yes or no.",
    "red green blue yellow purple orange white black gray cyan magenta brown pink",
    "circle circles square squares triangle triangles star stars diamond diamonds cross shape shapes",
    "count left right above below top bottom middle image picture there is are the a an of in on",
    "You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer "
    "MUST BE put in \\boxed{}.",
    "<think> I see 3 red shapes. </think> The answer is \\boxed{3}.",
    "<think> The triangle is blue. </think> \\boxed{blue}",
    "<think> yes </think> \\boxed{yes} <think> no </think> \\boxed{no}",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) . , : ; ? !",
    "user assistant system",
]


@dataclass(frozen=True)
class TinySize:
    """Sizes of one tiny preset (text decoder and vision encoder)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vocab: int


SIZES: dict[str, TinySize] = {
    # hidden 64, 2 layers: about 0.2 M parameters; a forward+backward takes milliseconds on a CPU.
    "smoke": TinySize(64, 2, 4, 2, 128, 32, 2, 2, 512),
    "small": TinySize(128, 4, 4, 2, 384, 64, 2, 2, 768),
    # a few million parameters: big enough to learn the synthetic task in minutes on 2 cores.
    "demo": TinySize(256, 4, 8, 4, 768, 128, 4, 4, 1024),
}


def train_tokenizer(specials: list[str], vocab_size: int, image_placeholder: str):
    """Train a byte-level BPE tokenizer in memory and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        specials: special tokens, in id order (ids 0..len-1).
        vocab_size: target vocabulary size (BPE merges stop earlier on a small corpus).
        image_placeholder: the token the chat template writes for an image part.

    Returns:
        A left-padding fast tokenizer with a chat template; ``<|im_end|>`` is the EOS token and
        ``<|endoftext|>`` the padding token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        padding_side="left",
        chat_template=_CHAT_TEMPLATE.replace("__IMAGE__", image_placeholder),
    )


def _qwen2_5_vl(size: TinySize, image_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from cppo_lightning.models.processors import ImageOnlyQwen2_5_VLProcessor

    tokenizer = train_tokenizer(_QWEN_SPECIALS, size.vocab, f"{VISION_START}{IMAGE_PAD}{VISION_END}")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIALS}
    head_dim = size.hidden // size.heads
    # Multimodal RoPE splits head_dim / 2 frequencies over (time, height, width).
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope},
            tie_word_embeddings=False,
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
        ),
        vision_config=dict(
            depth=size.vision_layers,
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_hidden * 2,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden,
            fullatt_block_indexes=[size.vision_layers - 1],
            window_size=56,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    # One token per 28 x 28 pixels: 56..image_size pixels a side -> 4..(image_size/28)^2 tokens.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": image_size * image_size}
    )
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    suppress = [ids[t] for t in (IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)]
    return model, processor, ids, suppress


def _llava(size: TinySize, image_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor

    tokenizer = train_tokenizer(_LLAVA_SPECIALS, size.vocab, LLAVA_IMAGE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _LLAVA_SPECIALS}
    # LLaVA sees a fixed-size crop: keep it small so a CPU forward stays cheap (16 image tokens at 56 px).
    side = min(image_size, 56)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_hidden * 2,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.vision_heads,
            image_size=side,
            patch_size=14,
            projection_dim=size.vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=4096,
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
        ),
        image_token_id=ids[LLAVA_IMAGE],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    suppress = [ids[t] for t in (IM_START, LLAVA_IMAGE)]
    return model, processor, ids, suppress


_BUILDERS = {"qwen2_5_vl": _qwen2_5_vl, "llava": _llava}


def build_tiny_vlm(
    folder: str | os.PathLike,
    architecture: str = "qwen2_5_vl",
    size: str = "smoke",
    seed: int = 0,
    image_size: int = 224,
) -> Path:
    """Build a tiny, randomly initialised VLM and save it (model, tokenizer, processor) to ``folder``.

    The result is deterministic for ``(architecture, size, seed, image_size)``: the same weights and
    the same tokenizer bytes every time.

    Args:
        folder: where to write; created if missing.
        architecture: a name of :data:`ARCHITECTURES` (``"qwen2_5_vl"``, ``"llava"``, ``"qwen3_vl"``, ``"qwen3_5"``,
            ``"gemma3"``, ``"idefics3"``: the architecture table's ``tiny`` names).
        size: a preset of :data:`SIZES` (``"smoke"``, ``"small"``, ``"demo"``).
        seed: weight initialisation seed.
        image_size: largest image side the processor keeps (Qwen) or the fixed crop (LLaVA, at most 56).

    Returns:
        The folder, ready for :func:`cppo_lightning.models.load_policy` or ``from_pretrained``.
    """
    if architecture not in _BUILDERS:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {ARCHITECTURES}")
    if size not in SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose one of {sorted(SIZES)}")
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor, ids, suppress = _BUILDERS[architecture](SIZES[size], image_size)
    generation = model.generation_config
    generation.eos_token_id = [ids[IM_END], ids[ENDOFTEXT]]
    generation.pad_token_id = ids[ENDOFTEXT]
    generation.bos_token_id = ids[ENDOFTEXT]
    # A random model samples structural tokens (an image placeholder in the completion breaks the next
    # forward with "image features and image tokens do not match"), so generation never emits them.
    generation.suppress_tokens = suppress
    generation.do_sample = True
    generation.temperature = 1.0
    generation.top_p = 1.0
    generation.top_k = 0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "tiny_vlm.json").write_text(
        json.dumps({"architecture": architecture, "size": size, "seed": seed, "image_size": image_size})
    )
    return folder


_SPEC = re.compile(r"^tiny:(?P<arch>[a-z0-9_]+)-(?P<size>[a-z]+)(?:@seed=(?P<seed>\d+))?$")


def is_tiny_spec(name: str) -> bool:
    """Whether ``name`` is a ``tiny:<architecture>-<size>[@seed=N]`` spec."""
    return isinstance(name, str) and name.startswith("tiny:")


def cache_dir() -> Path:
    """Folder where tiny models named by a spec are built: ``$CPPO_CACHE`` or ``~/.cache/cppo_lightning``."""
    return Path(os.environ.get("CPPO_CACHE", Path.home() / ".cache" / "cppo_lightning"))


def resolve_tiny_spec(name: str) -> Path:
    """Build (once) the tiny model a ``tiny:`` spec names and return its folder.

    Raises:
        ValueError: the spec is malformed or names an unknown architecture/size.
    """
    match = _SPEC.match(name)
    if match is None:
        raise ValueError(
            f"malformed tiny model spec {name!r}: expected 'tiny:<architecture>-<size>[@seed=N]', "
            f"architecture in {ARCHITECTURES}, size in {sorted(SIZES)}, e.g. 'tiny:qwen2_5_vl-smoke'"
        )
    arch, size, seed = match["arch"], match["size"], int(match["seed"] or 0)
    if arch not in _BUILDERS or size not in SIZES:
        raise ValueError(
            f"tiny model spec {name!r}: architecture must be one of {ARCHITECTURES} and size one of "
            f"{sorted(SIZES)}"
        )
    target = cache_dir() / "tiny" / f"{arch}-{size}-seed{seed}"
    return _build_once(target, "tiny_vlm.json", lambda folder: build_tiny_vlm(folder, arch, size, seed))


#: How long a rank waits for rank 0 to build a ``tiny:``/``random:`` model (a full-depth 7B takes minutes).
BUILD_WAIT_S = 1800.0


def _build_once(target: Path, marker: str, build) -> Path:
    """``build(folder)`` into a staging folder beside ``target``, renamed to it once complete (``marker``
    written last); a finished ``target`` is reused.

    In a distributed run only global rank 0 builds and the other ranks wait for its folder: transformers'
    ``save_pretrained`` writes the weights on rank 0 only, so another rank's folder would have none.
    """
    if (target / marker).exists():
        return target
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        deadline = time.monotonic() + BUILD_WAIT_S
        while not (target / marker).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rank {dist.get_rank()} waited {BUILD_WAIT_S:.0f} s for rank 0 to build {target}: build it "
                    "once in a single process first (cppo tiny ..., or load the spec once), on a file system "
                    "every node sees"
                )
            time.sleep(0.5)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent processes never read half a folder.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(staging)
        staging.rename(target)
    except OSError:  # another process won the race; its folder is identical
        if not (target / marker).exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- the newer families
# One builder per entry of the architecture table (cppo_lightning/architectures.py) with `tiny` set.


def _qwen3_family(size: TinySize, image_size: int, model_type: str):
    """Qwen3-VL or Qwen3.5: Qwen2.5-VL's tokens and processor contract, patch 16 x merge 2."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from cppo_lightning.models.processors import ImageOnlyQwen3VLProcessor

    tokenizer = train_tokenizer(_QWEN_SPECIALS, size.vocab, f"{VISION_START}{IMAGE_PAD}{VISION_END}")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIALS}
    head_dim = size.hidden // size.heads
    half = head_dim // 2
    # Interleaved multimodal RoPE over (time, height, width), in the released ratio (24, 20, 20).
    mrope = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": mrope,
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
    )
    vision = dict(
        depth=size.vision_layers,
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * 2,
        num_heads=size.vision_heads,
        out_hidden_size=size.hidden,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        # Learned positions on an 8 x 8 grid, interpolated to the image's patch grid.
        num_position_embeddings=64,
    )
    if model_type == "qwen3_vl":
        # DeepStack: the first block's features also enter the first decoder layer.
        vision["deepstack_visual_indexes"] = [0]
    else:
        # Qwen3.5: three Gated DeltaNet layers, then one full-attention layer (the released pattern).
        text.update(
            layer_types=["linear_attention"] * (size.layers - 1) + ["full_attention"],
            linear_num_key_heads=size.heads // 2,
            linear_num_value_heads=size.heads,
            linear_key_head_dim=head_dim,
            linear_value_head_dim=head_dim,
            partial_rotary_factor=1.0,
        )
    config = AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )
    model = AutoModelForImageTextToText.from_config(config)
    # One token per 32 x 32 pixels: 64..image_size pixels a side -> 4..(image_size/32)^2 tokens.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 64 * 64, "longest_edge": image_size * image_size},
        patch_size=16,
        merge_size=2,
    )
    processor = ImageOnlyQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    suppress = [ids[t] for t in (IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)]
    return model, processor, ids, suppress


def _qwen3_vl(size: TinySize, image_size: int):
    return _qwen3_family(size, image_size, "qwen3_vl")


def _qwen3_5(size: TinySize, image_size: int):
    return _qwen3_family(size, image_size, "qwen3_5")


_BUILDERS.update(qwen3_vl=_qwen3_vl, qwen3_5=_qwen3_5)
ARCHITECTURES = tuple(_BUILDERS)


GEMMA_BOI, GEMMA_IMAGE, GEMMA_EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
_GEMMA_SPECIALS = [ENDOFTEXT, IM_START, IM_END, GEMMA_BOI, GEMMA_IMAGE, GEMMA_EOI]


def _gemma3(size: TinySize, image_size: int):
    """Gemma 3: SigLIP at a fixed square size, average-pooled to ``mm_tokens_per_image`` tokens."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

    trained = train_tokenizer(_GEMMA_SPECIALS, size.vocab, GEMMA_BOI)
    # The processor reads these names off the tokenizer (Gemma's own tokenizer defines them); as named
    # special tokens they survive save_pretrained.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=trained.backend_tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        padding_side="left",
        chat_template=trained.chat_template,
        extra_special_tokens={"boi_token": GEMMA_BOI, "image_token": GEMMA_IMAGE, "eoi_token": GEMMA_EOI},
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _GEMMA_SPECIALS}
    # A fixed 56 px square: 4 x 4 patches of 14 px pooled 2 x 2 -> 4 tokens per image (Gemma 3: 896 px,
    # 64 x 64 patches pooled 4 x 4 -> 256).
    side, tokens = 56, 4
    head_dim = size.hidden // size.heads
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            max_position_embeddings=4096,
            # Local (sliding) then global attention, as the released 5:1 pattern ends.
            sliding_window=16,
            layer_types=["sliding_attention"] * (size.layers - 1) + ["full_attention"],
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_hidden * 2,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.vision_heads,
            image_size=side,
            patch_size=14,
            vision_use_head=False,
        ),
        mm_tokens_per_image=tokens,
        boi_token_index=ids[GEMMA_BOI],
        eoi_token_index=ids[GEMMA_EOI],
        image_token_index=ids[GEMMA_IMAGE],
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
    )
    model = Gemma3ForConditionalGeneration(config)
    image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side})
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=tokens,
    )
    suppress = [ids[t] for t in (IM_START, GEMMA_BOI, GEMMA_IMAGE, GEMMA_EOI)]
    return model, processor, ids, suppress


_BUILDERS.update(gemma3=_gemma3)
ARCHITECTURES = tuple(_BUILDERS)


IDEFICS_FAKE, IDEFICS_IMAGE, IDEFICS_GLOBAL = "<fake_token_around_image>", "<image>", "<global-img>"
_IDEFICS_SPECIALS = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    IDEFICS_FAKE,
    IDEFICS_IMAGE,
    "<end_of_utterance>",
    IDEFICS_GLOBAL,
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
]


def _idefics3(size: TinySize, image_size: int):
    """Idefics3 / SmolVLM: the longest side resized, split into square tiles plus a global view."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    tokenizer = train_tokenizer(_IDEFICS_SPECIALS, size.vocab, IDEFICS_IMAGE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _IDEFICS_SPECIALS}
    # 32 px tiles of 4 x 4 patches, pixel-shuffled 2 x 2 -> 4 tokens per tile; the longest side is
    # resized to 64 px: a square image is 2 x 2 tiles + the global view (SmolVLM: 384 px tiles, 1536 px).
    tile, patch, scale = 32, 8, 2
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_hidden * 2,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.vision_heads,
            image_size=tile,
            patch_size=patch,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=4096,
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
        ),
        scale_factor=scale,
        image_token_id=ids[IDEFICS_IMAGE],
        pad_token_id=ids[ENDOFTEXT],
    )
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_len=(tile // patch) ** 2 // scale**2,
    )
    suppress = [ids[t] for t in _IDEFICS_SPECIALS if t not in (ENDOFTEXT, IM_END)]
    return model, processor, ids, suppress


_BUILDERS.update(idefics3=_idefics3)
ARCHITECTURES = tuple(_BUILDERS)


# ---------------------------------------------------------------------------------------------------------
# Real architectures with random weights: ``random:<name>[@text_layers=N,vision_layers=M,seed=S,dtype=D]``
#
# The released checkpoints' shapes (every ``config.json`` field that sets a tensor size or the attention
# pattern), so that memory and time are those of the real model, without its weights: the hubs are
# unreachable here. The tokenizer stays a small trained one, but the embeddings and the LM head keep the real
# vocabulary (the largest single tensors of a 3B model), and the image processor is Qwen2.5-VL's own (patch
# 14, merge 2, its pixel limits), so that image token counts are real. Depth can be cut at full width.


@dataclass(frozen=True)
class RealArchitecture:
    """The shapes of a released checkpoint, from its ``config.json`` (see :data:`REAL_ARCHITECTURES`).

    Attributes:
        family: the builder (a key of ``_RANDOM_BUILDERS``).
        source: the hub id whose configuration these numbers are.
        text: text decoder fields (``Qwen2_5_VLTextConfig`` names).
        vision: vision tower fields (``Qwen2_5_VLVisionConfig`` names).
        image_processor: the checkpoint's ``preprocessor_config.json`` sizes.
    """

    family: str
    source: str
    text: dict
    vision: dict
    image_processor: dict

    @property
    def text_layers(self) -> int:
        """Decoder layers of the released model."""
        return self.text["num_hidden_layers"]

    @property
    def vision_layers(self) -> int:
        """Vision tower blocks of the released model."""
        return self.vision["depth"]


# Qwen2.5-VL's image processor, identical for 3B and 7B (preprocessor_config.json of both repositories):
# min_pixels 3136 (56 x 56), max_pixels 12845056 (16384 visual tokens of 28 x 28 pixels), patch 14,
# temporal patch 2, merge 2, and the CLIP mean/std.
_QWEN2_5_VL_IMAGE_PROCESSOR = dict(
    min_pixels=3136,
    max_pixels=12845056,
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)

# The vision tower is the same 32-block, 1280-wide ViT in both sizes; only its output projection (the merger's
# last linear layer) matches the text width. 3B: config.json's vision_config lists every field below. 7B:
# config.json lists hidden_size 1280 and tokens_per_second 2 and leaves the rest to Qwen2_5_VLVisionConfig's
# defaults (transformers: depth 32, intermediate 3420, 16 heads, out_hidden_size 3584, window 112,
# full attention in blocks 7, 15, 23, 31, patch 14, merge 2, temporal patch 2).
_QWEN2_5_VL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    hidden_act="silu",
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)

REAL_ARCHITECTURES: dict[str, RealArchitecture] = {
    # Qwen/Qwen2.5-VL-3B-Instruct config.json: hidden 2048, intermediate 11008, 36 layers, 16 heads,
    # 2 kv heads (head_dim 128), vocab 151936, rope_theta 1e6, mrope_section [16, 24, 24], rms_norm_eps 1e-6,
    # max_position_embeddings 128000, tie_word_embeddings true; vision out_hidden_size 2048.
    # 3.75 B parameters (its two bf16 safetensors shards: 3.98 + 3.53 GB).
    "qwen2_5_vl-3b": RealArchitecture(
        family="qwen2_5_vl",
        source="Qwen/Qwen2.5-VL-3B-Instruct",
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            rope_theta=1000000.0,
            mrope_section=[16, 24, 24],
            rms_norm_eps=1e-6,
            max_position_embeddings=128000,
            tie_word_embeddings=True,
        ),
        vision={**_QWEN2_5_VL_VISION, "out_hidden_size": 2048},
        image_processor=_QWEN2_5_VL_IMAGE_PROCESSOR,
    ),
    # Qwen/Qwen2.5-VL-7B-Instruct config.json (as mirrored in Qwen/Qwen2.5-VL-7B-Instruct-AWQ's): hidden 3584,
    # intermediate 18944, 28 layers, 28 heads, 4 kv heads (head_dim 128), vocab 152064 (not 3B's 151936: the
    # 7B keeps Qwen2.5-7B's padded embedding), rope_theta 1e6, mrope_section [16, 24, 24], rms_norm_eps 1e-6,
    # max_position_embeddings 128000, tie_word_embeddings false; vision out_hidden_size 3584 (the default).
    "qwen2_5_vl-7b": RealArchitecture(
        family="qwen2_5_vl",
        source="Qwen/Qwen2.5-VL-7B-Instruct",
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_theta=1000000.0,
            mrope_section=[16, 24, 24],
            rms_norm_eps=1e-6,
            max_position_embeddings=128000,
            tie_word_embeddings=False,
        ),
        vision={**_QWEN2_5_VL_VISION, "out_hidden_size": 3584},
        image_processor=_QWEN2_5_VL_IMAGE_PROCESSOR,
    ),
}

# Vocabulary the small tokenizer is trained to (BPE stops earlier on the small corpus); the model's embedding
# and head keep the real vocabulary, ids above the tokenizer's decode to nothing.
_RANDOM_TOKENIZER_VOCAB = 1024


def _cut_vision(vision: dict, layers: int) -> dict:
    """The vision fields with ``layers`` blocks; full-attention blocks past the cut are dropped, and a cut
    that keeps none makes its last block full-attention, so both attention kinds still run."""
    full = [index for index in vision["fullatt_block_indexes"] if index < layers] or [layers - 1]
    return {**vision, "depth": layers, "fullatt_block_indexes": full}


def real_architecture_config(name: str, text_layers: int | None = None, vision_layers: int | None = None):
    """The ``transformers`` config of a real architecture (depth optionally cut), without any weights.

    Token ids are those of the small tokenizer :func:`build_random_vlm` saves beside the model.

    Args:
        name: a key of :data:`REAL_ARCHITECTURES`, e.g. ``"qwen2_5_vl-3b"``.
        text_layers: decoder layers (default: the released number).
        vision_layers: vision blocks (default: the released number).

    Returns:
        ``(config, tokenizer, ids)``: a ``Qwen2_5_VLConfig``, the tokenizer and its structural token ids.

    Raises:
        ValueError: an unknown name, or a depth outside 1..the released depth.
    """
    if name not in REAL_ARCHITECTURES:
        raise ValueError(f"unknown real architecture {name!r}; choose one of {sorted(REAL_ARCHITECTURES)}")
    arch = REAL_ARCHITECTURES[name]
    text_layers = arch.text_layers if text_layers is None else text_layers
    vision_layers = arch.vision_layers if vision_layers is None else vision_layers
    for field_name, value, most in (
        ("text_layers", text_layers, arch.text_layers),
        ("vision_layers", vision_layers, arch.vision_layers),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ValueError(f"{name}: {field_name} must be an integer in 1..{most}, got {value!r}")
    return _RANDOM_BUILDERS[arch.family](arch, text_layers, vision_layers)


def _random_qwen2_5_vl_config(arch: RealArchitecture, text_layers: int, vision_layers: int):
    from transformers import Qwen2_5_VLConfig

    tokenizer = train_tokenizer(
        _QWEN_SPECIALS, _RANDOM_TOKENIZER_VOCAB, f"{VISION_START}{IMAGE_PAD}{VISION_END}"
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIALS}
    text = dict(arch.text)
    rope = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta"),
        "mrope_section": text.pop("mrope_section"),
    }
    tie = text.pop("tie_word_embeddings")
    text["num_hidden_layers"] = text_layers
    tokens = dict(bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT])
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            rope_parameters=rope,
            tie_word_embeddings=tie,
            hidden_act="silu",
            **tokens,
        ),
        vision_config=_cut_vision(arch.vision, vision_layers),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=tie,
        **tokens,
    )
    return config, tokenizer, ids


_RANDOM_BUILDERS = {"qwen2_5_vl": _random_qwen2_5_vl_config}


def build_random_vlm(
    folder: str | os.PathLike,
    name: str,
    text_layers: int | None = None,
    vision_layers: int | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    device: str | torch.device | None = None,
) -> Path:
    """Build a real architecture with random weights and save it (model, tokenizer, processor) to ``folder``.

    The weights are drawn in ``dtype`` directly (a 3B model at full depth is 7.5 GB in bf16, 15 GB in fp32),
    on ``device`` if given (a GPU draws them in seconds). Deterministic for ``(name, depths, seed, dtype,
    device type)``.

    Args:
        folder: where to write; created if missing.
        name: a key of :data:`REAL_ARCHITECTURES`.
        text_layers: decoder layers (default: the released number); the width is always the real one.
        vision_layers: vision blocks (default: the released number).
        seed: weight initialisation seed.
        dtype: ``"bfloat16"`` (the released checkpoints' dtype), ``"float32"`` or ``"float16"``.
        device: where to draw the weights (default: the CPU).

    Returns:
        The folder, loadable by :func:`cppo_lightning.models.load_policy` or ``from_pretrained``.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from cppo_lightning.models.processors import ImageOnlyQwen2_5_VLProcessor

    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    config, tokenizer, ids = real_architecture_config(name, text_layers, vision_layers)
    arch = REAL_ARCHITECTURES[name]
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtypes[dtype])
    pixels = arch.image_processor
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
        patch_size=pixels["patch_size"],
        temporal_patch_size=pixels["temporal_patch_size"],
        merge_size=pixels["merge_size"],
        image_mean=pixels["image_mean"],
        image_std=pixels["image_std"],
    )
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    generation = model.generation_config
    generation.eos_token_id = [ids[IM_END], ids[ENDOFTEXT]]
    generation.pad_token_id = ids[ENDOFTEXT]
    generation.bos_token_id = ids[ENDOFTEXT]
    # As for the tiny models: a random model must not sample image placeholders into its completions.
    generation.suppress_tokens = [ids[t] for t in (IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)]
    generation.do_sample = True
    generation.temperature = 1.0
    generation.top_p = 1.0
    generation.top_k = 0
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    (folder / "random_vlm.json").write_text(
        json.dumps(
            {
                "architecture": name,
                "source": arch.source,
                "text_layers": config.text_config.num_hidden_layers,
                "vision_layers": config.vision_config.depth,
                "seed": seed,
                "dtype": dtype,
                "parameters": parameters,
            }
        )
    )
    return folder


_RANDOM_SPEC = re.compile(
    r"^random:(?P<name>[a-z0-9_]+-[a-z0-9.]+)(?:@(?P<options>[a-z_]+=[a-z0-9]+(?:,[a-z_]+=[a-z0-9]+)*))?$"
)
_RANDOM_OPTIONS = {"text_layers": int, "vision_layers": int, "seed": int, "dtype": str}


def is_random_spec(name: str) -> bool:
    """Whether ``name`` is a ``random:<architecture>[@options]`` spec."""
    return isinstance(name, str) and name.startswith("random:")


def parse_random_spec(name: str) -> dict:
    """The arguments of :func:`build_random_vlm` a ``random:`` spec names.

    ``random:qwen2_5_vl-3b`` is the released depth in bf16; ``random:qwen2_5_vl-7b@text_layers=2,vision_layers=2``
    cuts depth at full width; ``seed=`` and ``dtype=`` (``bfloat16``, ``float32``, ``float16``) are optional.

    Raises:
        ValueError: a malformed spec, an unknown architecture or option (the message lists the valid ones).
    """
    match = _RANDOM_SPEC.match(name)
    if match is None or match["name"] not in REAL_ARCHITECTURES:
        raise ValueError(
            f"malformed random model spec {name!r}: expected 'random:<architecture>[@key=value,...]', "
            f"architecture in {sorted(REAL_ARCHITECTURES)}, keys in {sorted(_RANDOM_OPTIONS)}, "
            "e.g. 'random:qwen2_5_vl-3b@text_layers=2,vision_layers=2'"
        )
    arguments: dict = {"name": match["name"]}
    for option in (match["options"] or "").split(","):
        if not option:
            continue
        key, value = option.split("=")
        if key not in _RANDOM_OPTIONS or key in arguments:
            raise ValueError(
                f"random model spec {name!r}: option {key!r} is unknown or repeated; options are "
                f"{sorted(_RANDOM_OPTIONS)}"
            )
        try:
            arguments[key] = _RANDOM_OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"random model spec {name!r}: {key} must be an integer, got {value!r}") from None
    return arguments


def resolve_random_spec(name: str) -> Path:
    """Build (once) the model a ``random:`` spec names into the cache folder and return its folder.

    Full-depth models are large (a 3B in bf16: 7.5 GB); delete ``<cache>/random/`` when done with them.

    Raises:
        ValueError: see :func:`parse_random_spec`, and depths outside the released range.
    """
    arguments = parse_random_spec(name)
    arch = REAL_ARCHITECTURES[arguments["name"]]
    text = arguments.get("text_layers", arch.text_layers)
    vision = arguments.get("vision_layers", arch.vision_layers)
    dtype = arguments.get("dtype", "bfloat16")
    real_architecture_config(arguments["name"], text, vision)  # validates before anything is written
    target = (
        cache_dir()
        / "random"
        / f"{arguments['name']}-t{text}-v{vision}-{dtype}-seed{arguments.get('seed', 0)}"
    )
    return _build_once(target, "random_vlm.json", lambda folder: build_random_vlm(folder, **arguments))
