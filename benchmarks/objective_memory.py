"""Time and peak memory of the log-prob, entropy and CPPO objective paths on CPU.

Not a test: run it by hand to check that the chunked paths hold no more than about two copies
of the logits (the logits and their gradient), against the naive log_softmax computations.

    python benchmarks/objective_memory.py                      # 16 x 1024 x 32k, 2 GiB of logits
    python benchmarks/objective_memory.py --rows 4 --tokens 256 --vocab 8192 --no-naive

Peak memory is the growth of the process's resident set size (RSS) over what was resident
before the measured call (the logits included), read from the kernel's high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) where Linux allows it, else sampled by a
background thread. Large tensors are allocated with mmap and returned to the OS on free, so RSS
tracks live tensors closely.
"""

from __future__ import annotations

import argparse
import gc
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cppo_lightning.objectives import (
    CPPO,
    ObjectiveInputs,
    ViewOutputs,
    group_advantages,
    token_entropy,
    token_logprobs,
)

GIB = 2**30


def _return_freed_memory_to_the_os() -> None:
    """Make glibc mmap every allocation over 1 MiB, so freeing it lowers RSS at once.

    By default glibc raises its mmap threshold (up to 32 MiB) after large frees, after which
    blocks are kept in the heap and a later measurement would find them already resident.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 2**20)
        libc.mallopt(m_trim_threshold, 2**20)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _rss_bytes() -> int:
    try:
        return _status_kib("VmRSS") * 1024
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Peak RSS growth during a ``with`` block, in bytes (``.peak``)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.before = _rss_bytes()
        self.exact = self._reset_high_water_mark()
        self.sampled = self.before
        if not self.exact:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            high = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            high = self.sampled
        self.peak = max(0, high - self.before)

    @staticmethod
    def _reset_high_water_mark() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _status_kib("VmHWM") > 0
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _rss_bytes())
            time.sleep(0.001)


def measure(fn: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak RSS growth in bytes) of one call; whatever it returns is freed after."""
    with PeakRSS() as rss:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    del result
    gc.collect()
    return seconds, rss.peak


def naive_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        log_p = torch.log_softmax(logits / temperature, -1)
        return -(log_p.exp() * log_p).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per block (default: automatic)")
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per prompt for the advantages")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive log_softmax comparisons")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _return_freed_memory_to_the_os()

    torch.manual_seed(args.seed)
    rows, length, vocab, temp, chunk = args.rows, args.tokens, args.vocab, args.temperature, args.chunk_size
    logits = torch.randn(rows, length, vocab)  # randn writes every page: resident before measuring
    tokens = torch.randint(0, vocab, (rows, length))
    logits_bytes = logits.numel() * logits.element_size()
    results: list[tuple[str, float, int, int]] = []  # name, seconds, peak growth, logits held

    def logprobs_step(fn: Callable) -> Callable[[], None]:
        def step() -> None:
            logits.requires_grad_(True)
            fn(logits, tokens, temp).sum().backward()
            logits.grad = None
            logits.requires_grad_(False)

        return step

    seconds, peak = measure(logprobs_step(lambda x, y, z: token_logprobs(x, y, z, chunk)))
    results.append(("token_logprobs fwd+bwd (chunked)", seconds, peak, logits_bytes))
    if not args.no_naive:
        seconds, peak = measure(logprobs_step(naive_logprobs))
        results.append(("naive log_softmax+gather fwd+bwd", seconds, peak, logits_bytes))
    seconds, peak = measure(lambda: token_entropy(logits, temp, chunk))
    results.append(("token_entropy (chunked, no_grad)", seconds, peak, logits_bytes))
    if not args.no_naive:
        seconds, peak = measure(lambda: naive_entropy(logits, temp))
        results.append(("naive entropy (no_grad)", seconds, peak, logits_bytes))

    # Full CPPO step from logits: I for every row, I+ and I- for the rows with A > 0 only.
    rewards = torch.randint(0, 2, (rows,)).float()
    advantages = group_advantages(rewards, args.group_size if rows % args.group_size == 0 else 1)
    objective = CPPO()
    view_rows = objective.view_rows(advantages).nonzero().flatten()
    plus_logits = torch.randn(view_rows.numel(), length, vocab)
    minus_logits = torch.randn(view_rows.numel(), length, vocab)
    response = torch.ones(rows, length, dtype=torch.bool)
    response[:, length * 3 // 4 :] = torch.rand(rows, 1) < 0.5  # some right padding
    ref = torch.randn(rows, length).abs().neg()
    all_logits_bytes = logits_bytes + 2 * plus_logits.numel() * plus_logits.element_size()

    def cppo_step() -> None:
        for x in (logits, plus_logits, minus_logits):
            x.requires_grad_(True)
        lp = token_logprobs(logits, tokens, temp, chunk)
        view_tokens = tokens[view_rows]
        inputs = ObjectiveInputs(
            logprobs=lp,
            response_mask=response,
            advantages=advantages,
            ref_logprobs=ref,
            entropy=token_entropy(logits, temp, chunk),
            views={
                "preserving": ViewOutputs(view_rows, token_logprobs(plus_logits, view_tokens, temp, chunk)),
                "removing": ViewOutputs(
                    view_rows,
                    token_logprobs(minus_logits, view_tokens, temp, chunk),
                    entropy=token_entropy(minus_logits, temp, chunk),
                ),
            },
        )
        loss, _ = objective(inputs)
        loss.backward()
        for x in (logits, plus_logits, minus_logits):
            x.grad = None
            x.requires_grad_(False)

    seconds, peak = measure(cppo_step)
    name = f"CPPO step from logits ({view_rows.numel()}/{rows} view rows)"
    results.append((name, seconds, peak, all_logits_bytes))

    lp_only = torch.randn(rows, length).abs().neg()
    views_only = {
        "preserving": ViewOutputs(view_rows, lp_only[view_rows] - 0.1),
        "removing": ViewOutputs(
            view_rows, lp_only[view_rows] - 0.5, entropy=torch.rand(view_rows.numel(), length)
        ),
    }

    def objective_only() -> None:
        lp = lp_only.clone().requires_grad_()
        entropy = torch.rand(rows, length)
        inputs = ObjectiveInputs(
            lp, response, advantages, ref_logprobs=ref, entropy=entropy, views=views_only
        )
        objective(inputs)[0].backward()

    seconds, peak = measure(objective_only)
    results.append(("CPPO objective on [R, T] log-probs", seconds, peak, 0))

    print(
        f"logits [{rows}, {length}, {vocab}] float32 = {logits_bytes / GIB:.2f} GiB, temperature {temp}, "
        f"chunk_size {chunk or 'auto'}, {torch.get_num_threads()} threads, "
        f"peak via {'VmHWM' if PeakRSS._reset_high_water_mark() else 'sampling'}"
    )
    header = f"{'path':<44} {'time s':>8} {'peak +RSS GiB':>14} {'+RSS / logits':>14} {'held / logits':>14}"
    print(header)
    print("-" * len(header))
    for name, seconds, peak, held in results:
        if held:
            # "held": logits of the measured path (resident before) plus the growth, in logits copies.
            ratio, total = f"{peak / held:.2f}x", f"{(held + peak) / held:.2f}x"
        else:
            ratio = total = "-"
        print(f"{name:<44} {seconds:>8.2f} {peak / GIB:>14.3f} {ratio:>14} {total:>14}")
    print(
        "\n+RSS / logits: peak growth over the resident logits, in copies of the logits of that path "
        "(the CPPO row counts all three views). held / logits = 1 + that: logits plus everything else."
    )


if __name__ == "__main__":
    main()
