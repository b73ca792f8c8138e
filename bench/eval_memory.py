"""Benchmark: peak extra memory of held-out evaluation, the chunked kernels vs full fp32 logits.

    python bench/eval_memory.py --vocab 151936 --tokens 1024 --rounds 2

Two tiny random Llamas (1 layer, hidden 64) with a ``--vocab`` head, one batch of ``--tokens`` counted tokens:

  full     both models' fp32 ``[tokens, vocab]`` logits, log-softmax, KL, argmax, cross-entropy: what evaluation did
           before it went through the kernels (the reference of tests/distill/evaluation/test_evaluator.py)
  chunked  ``distill.evaluation.metrics.token_metrics`` at ``--chunk-size`` (the objective's kernels)

Each variant runs in a fresh process; its figure is the peak RSS (``ru_maxrss``) minus the RSS once both models ran a
short warm-up batch (torch's CPU allocator returns large blocks to the OS, so that is the peak of live tensors).
Rounds alternate the order (A B, B A). Both print the KL, which must agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(variant: str, vocab: int, tokens: int, chunk_size: int) -> dict[str, float]:
    import torch

    from distill.evaluation.metrics import token_metrics
    from distill.student.tiny import tiny_llama
    from tests.distill.evaluation.test_evaluator import full_logit_sums

    student = tiny_llama(vocab, hidden_size=64, num_layers=1, seed=1).eval()
    teacher = tiny_llama(vocab, hidden_size=64, num_layers=1, seed=2).eval()
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with torch.no_grad():  # warm-up: the models' own buffers and the allocator's first blocks
        for model in (student, teacher):
            model(input_ids=ids[:, :8], attention_mask=batch["attention_mask"][:, :8])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "chunked":
        kl = token_metrics(student, teacher, [batch], vocab, chunk_size=chunk_size)["kl"]
    else:
        sums = full_logit_sums(student, teacher, [batch], vocab)
        kl = (sums[0] / sums[3]).item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"variant": variant, "peak_extra_mib": peak / 1024, "kl": kl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=128, help="loss.chunk_size (its default)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", choices=("full", "chunked"), help=argparse.SUPPRESS)  # one measuring process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.vocab, args.tokens, args.chunk_size)))
        return
    results: dict[str, list[dict[str, float]]] = {"full": [], "chunked": []}
    for round_ in range(args.rounds):
        for variant in ("full", "chunked") if round_ % 2 == 0 else ("chunked", "full"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--variant",
                    variant,
                    "--vocab",
                    str(args.vocab),
                    "--tokens",
                    str(args.tokens),
                    "--chunk-size",
                    str(args.chunk_size),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = max(r["peak_extra_mib"] for r in results["full"])
    chunked = max(r["peak_extra_mib"] for r in results["chunked"])
    print(
        f"vocab {args.vocab}, {args.tokens} tokens, chunk {args.chunk_size}: full {full:.0f} MiB, chunked "
        f"{chunked:.0f} MiB ({chunked / full:.3f}x); KL full {results['full'][0]['kl']:.7f}, chunked "
        f"{results['chunked'][0]['kl']:.7f}"
    )


if __name__ == "__main__":
    main()
