"""Peak tensor memory of a call: ``max_memory_allocated`` on CUDA, the profiler's allocation events on CPU.

Resident set size (RSS) is a poor measure on a CPU: the allocator keeps freed blocks, other threads
allocate, and pages stay resident. PyTorch's profiler records every CPU tensor allocation and free
(``profile_memory=True``); summing them in time order gives the live tensor bytes at every moment,
which is what ``torch.cuda.max_memory_allocated`` measures on a GPU.

    from memory import peak_tensor_memory
    result, peak_bytes = peak_tensor_memory(lambda: loss_and_backward(...), device)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def peak_tensor_memory(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Run ``fn`` and return its result and the peak of tensor memory allocated during it, in bytes.

    The peak is relative to the memory allocated when the call starts (tensors that already exist
    are not counted; tensors ``fn`` allocates and returns are).

    Args:
        fn: the call to measure.
        device: where its tensors live (``"cuda"``: allocator statistics; otherwise the CPU profiler).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return result, peak
