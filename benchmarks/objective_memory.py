"""Peak memory of the update's loss path at a real vocabulary: chunked head vs full logits.

The loss path starts at the backbone's last hidden states and ends with their gradient: the
language-model head, sampled-token log-probs, entropies, the CPPO objective and its backward. The
update runs it with the head applied chunk by chunk (``score_positions``); the naive path computes
``head(hidden)`` as one ``[rows, T, V]`` logits tensor. Printed: peak tensor memory (the profiler's
allocation events on CPU, ``max_memory_allocated`` on CUDA) and its ratio to ONE fp32 logits tensor
of the stacked rows, ``rows x T x V x 4`` bytes. Measured in one run of this script.

    python benchmarks/objective_memory.py                                   # V = 151,936, T = 1024, 2048
    python benchmarks/objective_memory.py --tokens 256 --naive              # also the naive path
    python benchmarks/objective_memory.py --hidden 2048 --device cuda       # Qwen2.5-VL-3B width, on a GPU

The hidden size changes the time (the head's matmuls), not the logits' memory: the default 256
keeps a CPU run to minutes. ``--rollouts 2`` with CPPO's two views gives 6 stacked rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from memory import peak_tensor_memory  # noqa: E402

from cppo_lightning.models.scoring import LanguageModelHead, score_positions  # noqa: E402
from cppo_lightning.objectives import (  # noqa: E402
    CPPO,
    ObjectiveInputs,
    ViewScores,
    token_entropy,
    token_logprobs,
)

GIB = 2**30
VIEWS = ("original", "preserving", "removing")


def case(rollouts: int, tokens: int, hidden: int, vocab: int, device: torch.device, seed: int = 0):
    """Hidden states of ``rollouts`` rows under the three views, stacked, and their sampled tokens."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device).requires_grad_(False)  # frozen under LoRA
    with torch.no_grad():
        head.weight.normal_(0, hidden**-0.5, generator=None)
    states = torch.randn(3 * rollouts, tokens, hidden, generator=generator).to(device).requires_grad_()
    ids = torch.randint(0, vocab, (rollouts, tokens), generator=generator).to(device)
    return head, states, ids


def cppo_loss(logprobs: list[torch.Tensor], entropies: list[torch.Tensor], rollouts: int) -> torch.Tensor:
    """CPPO's loss on the three views (every rollout with A > 0: all of them carry I+ and I-)."""
    device = logprobs[0].device
    every = torch.ones(rollouts, dtype=torch.bool, device=device)
    views = {
        "preserving": ViewScores(logprobs[1], every),
        "removing": ViewScores(logprobs[2], every, entropy=entropies[2]),
    }
    inputs = ObjectiveInputs(
        logprobs=logprobs[0],
        response_mask=torch.ones_like(logprobs[0], dtype=torch.bool),
        advantages=torch.linspace(0.5, 1.5, rollouts, device=device),
        ref_logprobs=logprobs[0].detach() - 0.1,
        entropy=entropies[0],
        views=views,
    )
    return CPPO(cpl_weight=1.0)(inputs).loss


def chunked_step(head, states, ids, rollouts, chunk_tokens):
    """The update's path: the head over chunks of response positions, recomputed in backward."""
    tokens = ids.shape[1]
    scorer = LanguageModelHead(backbone=torch.nn.Identity(), head=head)
    logprobs, entropies = [], []
    for view in range(3):
        rows = states[view * rollouts : (view + 1) * rollouts]
        scores = score_positions(
            scorer,
            rows.reshape(-1, rows.shape[-1]),
            ids.reshape(-1),
            1.0,
            entropy=True,
            chunk_tokens=chunk_tokens,
        )
        logprobs.append(scores.logprobs.view(rollouts, tokens))
        entropies.append(scores.entropy.view(rollouts, tokens))
    loss = cppo_loss(logprobs, entropies, rollouts)
    loss.backward()
    return float(loss.detach())


def naive_step(head, states, ids, rollouts):
    """One ``[3 x rollouts, T, V]`` logits tensor, then the log-prob and entropy kernels over it."""
    logits = head(states).float()
    stacked_ids = ids.repeat(3, 1)
    logprobs = token_logprobs(logits, stacked_ids).split(rollouts)
    entropies = token_entropy(logits.detach()).split(rollouts)
    loss = cppo_loss(list(logprobs), list(entropies), rollouts)
    loss.backward()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048], help="completion lengths")
    parser.add_argument("--rollouts", type=int, default=2, help="rollouts with A > 0 (3 stacked rows each)")
    parser.add_argument("--vocab", type=int, default=151_936, help="Qwen2.5-VL's vocabulary by default")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--chunk-tokens", type=int, default=None, help="positions per head chunk (default: auto)"
    )
    parser.add_argument("--naive", action="store_true", help="also measure the full-logits path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = 3 * args.rollouts
    print(
        f"device {device}, {torch.get_num_threads()} threads; {args.rollouts} rollouts x 3 views = {rows} stacked "
        f"rows, vocabulary {args.vocab:,}, hidden {args.hidden}, fp32 head (frozen)"
    )
    print(f"{'path':<34}{'T':>6}{'seconds':>10}{'peak GiB':>10}{'logits GiB':>12}{'peak/logits':>13}")
    for tokens in args.tokens:
        logits_bytes = rows * tokens * args.vocab * 4
        paths = [
            (
                "chunked head (the update's)",
                lambda h, s, i: chunked_step(h, s, i, args.rollouts, args.chunk_tokens),
            )
        ]
        if args.naive:
            paths.append(("full logits (naive)", lambda h, s, i: naive_step(h, s, i, args.rollouts)))
        for name, step in paths:
            tensors = case(args.rollouts, tokens, args.hidden, args.vocab, device)
            started = time.perf_counter()
            _, peak = peak_tensor_memory(lambda: step(*tensors), device)
            seconds = time.perf_counter() - started
            print(
                f"{name:<34}{tokens:>6}{seconds:>10.1f}{peak / GIB:>10.3f}{logits_bytes / GIB:>12.3f}"
                f"{peak / logits_bytes:>13.3f}"
            )


if __name__ == "__main__":
    main()
