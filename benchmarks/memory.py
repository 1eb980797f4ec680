"""Peak tensor memory of a call: ``max_memory_allocated`` on CUDA, the profiler's allocation events on CPU.

Resident set size (RSS) is a poor measure on a CPU: the allocator keeps freed blocks, other threads
allocate, and pages stay resident. PyTorch's profiler records every CPU tensor allocation and free
(``profile_memory=True``); summing them in time order gives the live tensor bytes at every moment,
which is what ``torch.cuda.max_memory_allocated`` measures on a GPU.

    from memory import peak_tensor_memory
    result, peak_bytes = peak_tensor_memory(lambda: loss_and_backward(...), device)

or, around a block, ``with TensorMemory(device) as meter: ...`` then ``meter.peak``.
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
    with TensorMemory(device) as meter:
        result = fn()
    return result, meter.peak


class TensorMemory:
    """The same measurement as :func:`peak_tensor_memory`, around a block::

        with TensorMemory(device) as meter:
            ...
        meter.peak      # bytes above what was allocated when the block started
        meter.start     # bytes allocated when it started (CUDA only; None on the CPU)
        meter.reserved  # the allocator's peak reservation during the block (CUDA only)

    Blocks must not nest (CUDA resets the peak statistics; the CPU profiler does not nest).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak = 0
        self.start: int | None = None
        self.reserved: int | None = None
        self._profile = None

    def __enter__(self) -> TensorMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            self.reserved = torch.cuda.max_memory_reserved(self.device)
            return
        from torch.autograd import DeviceType

        self._profile.__exit__(*exc_info)
        events = [
            event
            for event in self._profile.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
        ]
        live = peak = 0
        for event in sorted(events, key=lambda event: event.start_ns()):
            live += event.nbytes()  # negative for a free
            peak = max(peak, live)
        self.peak = peak
        self._profile = None
