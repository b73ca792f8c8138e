"""Peak resident memory of ``distill prune`` on a bf16 checkpoint: this code (weights kept in bf16, float32
statistics) against another checkout of the project (``--baseline``, e.g. the commit before, which loaded a float32
copy), runs interleaved A, B, A, B. Each run is a fresh process (its own peak), with a cold importance cache.

    git archive c0e8670 | tar -x -C /tmp/base    # the code before
    python bench/prune_memory.py --baseline /tmp/base [--layers 12 --hidden 512 --intermediate 1536 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXTS = ["The quick brown fox jumps over the lazy dog and keeps running far away.", "What is 12 plus 7? It is 19."]
# Runs one prune in this process and prints its peak RSS (ru_maxrss is in KiB on Linux) and wall time.
RUNNER = """
import resource, sys, time
from kd_recipes.cli import distill_main
start = time.perf_counter()
assert distill_main(sys.argv[1:]) == 0
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - start)
"""

FLOOR = """
import resource
import transformers.models.llama.modeling_llama
from kd_recipes.cli import distill_main
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def build_teacher(root: Path, args: argparse.Namespace) -> tuple[Path, int]:
    import torch

    from distill.student.tiny import tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(TEXTS * 50, vocab_size=400)
    model = tiny_llama(
        len(tokenizer),
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=args.intermediate,
    )
    model.to(torch.bfloat16).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    with (root / "cal.jsonl").open("w") as handle:
        for i in range(args.samples):
            handle.write(json.dumps({"text": " ".join(TEXTS * 20) + f" sample {i}"}) + "\n")
    return root / "teacher", sum(p.numel() for p in model.parameters())


def one_run(code: Path, root: Path, name: str, args: argparse.Namespace) -> tuple[float, float]:
    argv = [
        "prune",
        "--model",
        str(root / "teacher"),
        "--output-dir",
        str(root / name),
        "--calibration.data",
        str(root / "cal.jsonl"),
        "--calibration.num_samples",
        str(args.samples),
        "--calibration.max_length",
        str(args.length),
        "--cache_dir",
        str(root / f"cache-{name}"),
        "--depth.num_layers",
        str(args.layers // 2),
        "--width.intermediate_size",
        str(args.intermediate // 2),
    ]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, *argv], env=env, capture_output=True, text=True, cwd=code, check=True
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    rss, seconds = map(float, line.split()[1:])
    return rss, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the code to compare against")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prune-memory-"))
    teacher, params = build_teacher(root, args)
    weights = sum(f.stat().st_size for f in teacher.glob("*.safetensors")) / 2**20
    print(f"teacher: {params / 1e6:.1f} M parameters, {weights:.0f} MiB of bf16 safetensors")
    floor = subprocess.run(
        [sys.executable, "-c", FLOOR],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[-1]
    print(f"floor (imports only, no model): peak RSS {float(floor):.0f} MiB")
    results: dict[str, list[tuple[float, float]]] = {"baseline": [], "this": []}
    for repeat in range(args.repeats):
        for label, code in (("baseline", args.baseline), ("this", REPO)):
            rss, seconds = one_run(code, root, f"{label}-{repeat}", args)
            results[label].append((rss, seconds))
            print(f"{label:8s} run {repeat}: peak RSS {rss:7.0f} MiB, {seconds:5.1f} s")
    for label, runs in results.items():
        print(f"{label:8s} best: peak RSS {min(r for r, _ in runs):7.0f} MiB, {min(s for _, s in runs):5.1f} s")


if __name__ == "__main__":
    main()
