"""Benchmark: distillation loss + backward from hidden states, naive vs TRL's chunked kernel vs ours.

    python bench/kd_loss.py --vocab 151936 --hidden 896 --tokens 1024 --kind forward_kl --chunk-size 128

Variants (each in a fresh subprocess, so peak memory of one cannot hide inside another's):
  naive  full student and teacher logits in fp32, log_softmax, KL
         (``distill.losses.divergences.per_token_divergence``), backward
  trl    ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (forward_kl / reverse_kl / jsd only)
  ours   ``distill.losses.divergences.chunked_divergence``

Peak extra memory: on CPU the peak RSS (``ru_maxrss``) minus the RSS once inputs exist -- torch's CPU allocator
returns large blocks to the OS, so the peak RSS is the peak of live tensors; on CUDA ``max_memory_allocated`` minus
the allocated bytes once inputs exist. Time: median of ``--repeats`` runs after one warm-up. Ratios are vs naive.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Runnable as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("naive", "trl", "ours")
TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}  # TRL's kernel selects the divergence by beta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="teacher hidden size (default: --hidden)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=128, help="tokens per chunk of our kernel")
    parser.add_argument(
        "--softcap",
        type=float,
        default=0.0,
        help="both heads soft-capped as Gemma-2/3's (c * tanh(logits / c)); 0 = plain heads",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def loss_fn(args: argparse.Namespace, variant: str):
    """A closure computing the scalar loss (sum over tokens) of one variant from (hs, ws, ht, wt)."""
    import torch

    from distill.losses.divergences import chunked_divergence, per_token_divergence

    cap = args.softcap
    if variant == "naive":

        def naive(hs, ws, ht, wt):
            with torch.no_grad():
                teacher_logits = (ht @ wt.t()).float()
            student_logits = (hs @ ws.t()).float()
            if cap:  # what Gemma2ForCausalLM.forward does to its logits (transformers 5.24)
                teacher_logits = torch.tanh(teacher_logits / cap) * cap
                student_logits = torch.tanh(student_logits / cap) * cap
            return per_token_divergence(
                student_logits, teacher_logits, args.kind, temperature=args.temperature, beta=args.beta
            ).sum()

        return naive
    if variant == "trl":
        if cap:
            raise SystemExit("--softcap: TRL's kernel has no soft-capped head")
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # trl 1.16 signature

        beta = TRL_BETA.get(args.kind, args.beta)

        def trl(hs, ws, ht, wt):
            divergence, _entropy = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta, args.temperature)
            # TRL does not multiply by temperature**2; we do, so scale for comparable values.
            return divergence.sum() * args.temperature**2

        return trl

    from distill.losses.head import OutputHead

    def ours(hs, ws, ht, wt):
        if cap:
            ws, wt = OutputHead(ws, softcap=cap), OutputHead(wt, softcap=cap)
        return chunked_divergence(
            hs, ws, ht, wt, args.kind, temperature=args.temperature, beta=args.beta, chunk_size=args.chunk_size
        )

    return ours


def _current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> dict[str, float]:
    """Runs one variant in this process and returns its peak extra memory, median time and loss."""
    import torch

    cuda = args.device.startswith("cuda")
    gen = torch.Generator(device=args.device).manual_seed(0)
    t_hidden = args.teacher_hidden or args.hidden

    def randn(*shape: int, scale: float) -> torch.Tensor:
        # In place: `randn(...) * scale` would briefly hold two copies and inflate the baseline peak below.
        return torch.randn(*shape, generator=gen, device=args.device).mul_(scale)

    hs = randn(args.tokens, args.hidden, scale=1.0).requires_grad_(True)
    ws = randn(args.vocab, args.hidden, scale=args.hidden**-0.5).requires_grad_(True)
    ht = randn(args.tokens, t_hidden, scale=1.0)
    wt = randn(args.vocab, t_hidden, scale=t_hidden**-0.5)
    step = loss_fn(args, args.worker)
    # Warm up kernels and allocator on tiny shapes so their one-off buffers land in the baseline.
    step(hs[:2].detach().requires_grad_(True), ws[:64].detach().requires_grad_(True), ht[:2], wt[:64]).backward()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        # ru_maxrss is a high-water mark: it is a valid baseline only if nothing so far peaked above today's RSS.
        current = _current_rss()
        if baseline > current * 1.05:
            raise SystemExit(f"baseline peak RSS {baseline >> 20} MiB exceeds current RSS {current >> 20} MiB")

    times, loss = [], 0.0
    for i in range(args.repeats + 1):
        hs.grad = ws.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = step(hs, ws, ht, wt)
        value.backward()
        if cuda:
            torch.cuda.synchronize()
        if i > 0:  # the first full-size run is a warm-up
            times.append(time.perf_counter() - start)
        loss = value.item()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    grad_norm = float(torch.linalg.vector_norm(hs.grad.float()))
    return {"peak_bytes": peak, "median_s": statistics.median(times), "loss": loss, "grad_norm": grad_norm}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    if args.kind not in ("forward_kl", "reverse_kl", "jsd") and "trl" in variants:
        print(f"note: TRL's kernel has no {args.kind}; skipping it")
        variants.remove("trl")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    results: dict[str, dict[str, float]] = {}
    for variant in variants:
        proc = subprocess.run(
            [sys.executable, __file__, *forwarded, "--worker", variant], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"variant {variant} failed with exit code {proc.returncode}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(
        f"vocab={args.vocab} hidden={args.hidden} teacher_hidden={args.teacher_hidden or args.hidden} "
        f"tokens={args.tokens} kind={args.kind} T={args.temperature} chunk_size={args.chunk_size} "
        f"softcap={args.softcap} device={args.device} repeats={args.repeats}"
    )
    base = results.get("naive")
    print(f"{'variant':<8}{'peak extra MiB':>16}{'median s':>10}{'mem/naive':>11}{'time/naive':>12}{'loss':>14}")
    for variant, r in results.items():
        # Tiny problems can fit in memory the process already holds (0 bytes extra): no ratio then.
        mem_ratio = r["peak_bytes"] / base["peak_bytes"] if base and base["peak_bytes"] > 0 else float("nan")
        time_ratio = r["median_s"] / base["median_s"] if base and base["median_s"] > 0 else float("nan")
        print(
            f"{variant:<8}{r['peak_bytes'] / 2**20:>16.0f}{r['median_s']:>10.2f}{mem_ratio:>11.2f}{time_ratio:>12.2f}"
            f"{r['loss']:>14.4f}"
        )
    if base:
        for variant, r in results.items():
            rel = abs(r["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12)
            grad_rel = abs(r["grad_norm"] - base["grad_norm"]) / max(base["grad_norm"], 1e-12)
            print(f"{variant}: loss rel. diff vs naive {rel:.1e}, |grad hidden| rel. diff {grad_rel:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
