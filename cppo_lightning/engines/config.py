"""Options of the rollout engines (plain dataclasses: YAML keys under ``model.rollout``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VLLMConfig:
    """The colocated vLLM engine (``model.rollout.engine: vllm``), keys under ``model.rollout.vllm``.

    Args:
        gpu_memory_utilization: fraction of the GPU memory vLLM may take for its weights and KV cache
            (the rest is the trainer's). Colocated with training, 0.3-0.5 is usual.
        enable_sleep_mode: free vLLM's KV cache and offload its weights while the policy trains
            (``LLM.sleep``/``wake_up`` around each rollout). Not available on vLLM's CPU backend.
        sleep_level: 1 offloads the weights to host memory, 2 discards them (they are re-synced
            from the policy at every rollout anyway).
        dtype: vLLM's weight dtype; ``"auto"``: the trained policy's dtype (fp32 tiny models stay fp32,
            a bf16 policy samples in bf16).
        max_model_len: longest prompt + completion in tokens (None: the checkpoint's limit). Smaller
            values shrink the KV cache vLLM reserves.
        max_num_seqs: sequences decoded together (None: vLLM's default).
        enforce_eager: no CUDA graphs / compilation (faster start-up, slower decoding).
        kv_cache_memory_gb: KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``), instead of what
            ``gpu_memory_utilization`` leaves. On vLLM's CPU backend ``gpu_memory_utilization`` is a
            fraction of host memory; set this there to keep the reservation small.
        multiprocessing: run vLLM's engine core in a child process (vLLM's default). False keeps it in
            the training process (TRL's ``vllm_mode="colocate"``): faster start-up, and full
            fine-tuning weights are synced from memory instead of through a checkpoint folder.
        quantization: vLLM quantization method of the sampler's weights (e.g. ``"bitsandbytes"``);
            None samples from the full-precision base (under QLoRA the trained 4-bit base then differs
            slightly from the sampler: ``train/sampler_logprob_mismatch`` shows by how much).
        enable_prefix_caching: share the prompt's KV cache between the ``G`` samples of a prompt
            (None: vLLM's default).
        seed: seed of vLLM's own random state (each request also gets a seed derived from the step).
        extra: further keyword arguments for ``vllm.LLM`` (e.g. ``{"tensor_parallel_size": 2}``).
    """

    gpu_memory_utilization: float = 0.3
    enable_sleep_mode: bool = False
    sleep_level: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    kv_cache_memory_gb: float | None = None
    multiprocessing: bool = False
    quantization: str | None = None
    enable_prefix_caching: bool | None = None
    seed: int = 0
    extra: dict | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"model.rollout.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.sleep_level not in (1, 2):
            raise ValueError(f"model.rollout.vllm.sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(
                f"model.rollout.vllm.kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}"
            )
