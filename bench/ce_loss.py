"""Benchmark: the `ce` term's kernel (gradient computed in the forward pass) against the checkpointed cross-entropy it
replaced (each chunk's logits recomputed in backward), loss + backward from hidden states, in one process.

    python bench/ce_loss.py                                   # three sizes, 7 interleaved repetitions each
    python bench/ce_loss.py --sizes 151936:896:1024 --chunk-size 256

The two variants alternate (one call of each in turn), so load drift on a shared machine hits both alike; the
script also asserts that they give the same loss and gradients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from distill.losses.divergences import chunked_cross_entropy_sum  # noqa: E402


def checkpointed_cross_entropy_sum(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    """The previous implementation: F.cross_entropy per chunk under activation checkpointing."""

    def chunk_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ w.t()).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(chunk_loss, hidden[rows], head, targets[rows], use_reentrant=False)
    return total


def measure(vocab: int, hidden_size: int, tokens: int, chunk_size: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    head = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    variants = {"checkpointed": checkpointed_cross_entropy_sum, "in-forward": chunked_cross_entropy_sum}
    times: dict[str, list[float]] = {name: [] for name in variants}
    results = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            hidden.grad = head.grad = None
            start = time.perf_counter()
            loss = fn(hidden, head, targets, chunk_size)
            loss.backward()
            times[name].append(time.perf_counter() - start)
            results[name] = (loss.detach(), hidden.grad.clone(), head.grad.clone())
    for a, b in zip(results["checkpointed"], results["in-forward"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    return statistics.median(times["checkpointed"]), statistics.median(times["in-forward"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default="384:128:3000,2000:256:1536,32000:512:1024", help="comma-separated vocab:hidden:tokens"
    )
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print("| vocab | hidden | tokens | checkpointed CE (ms) | in-forward CE (ms) | in-forward / checkpointed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        vocab, hidden_size, tokens = (int(x) for x in size.split(":"))
        old, new = measure(vocab, hidden_size, tokens, args.chunk_size, args.repeats)
        print(f"| {vocab:,} | {hidden_size} | {tokens:,} | {old * 1e3:.1f} | {new * 1e3:.1f} | {new / old:.2f}x |")


if __name__ == "__main__":
    main()
