"""Checkpoint and resume cost versus student size: checkpoint size on disk, save time, and the wall time from launching
``distill train --resume auto`` to its first resumed optimizer step.

    python bench/resume.py                    # single process, three student sizes
    python bench/resume.py --launcher zero3   # 2-process ZeRO-3 through accelerate launch (launch/zero3.yaml)
    python bench/resume.py --manifest-mb 2 50 300   # the manifest's hashing alone, on checkpoints of these sizes

For each size: a fresh run of 2 steps saving a checkpoint after each (save time: the `saved ... in X s` lines the
trainer logs, barriers included), then a resumed run to step 3, timed from process start until step 3 appears in
metrics.jsonl. Everything runs on tiny randomly initialised Llamas built here (no downloads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CORPUS = ["What is 12 plus 7? The answer is 19.", "List three colors: red, green, blue."] * 40
SIZES = {"tiny": (64, 2), "small": (256, 4), "medium": (512, 8)}  # student hidden size, layers


def build_models(root: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    from distill.student.tiny import tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    paths = []
    for name, (h, n) in (("teacher", (64, 2)), ("student", (hidden, layers))):
        model = tiny_llama(len(tokenizer), hidden_size=h, num_layers=n)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(root / name)
        if name == "student":
            params = sum(p.numel() for p in model.parameters())
    return paths[0], paths[1], params


def train_command(launcher: str, teacher: Path, student: Path, data: Path, out: Path, steps: int) -> list[str]:
    prefix = [sys.executable, "-m"]
    if launcher == "zero3":
        prefix = ["accelerate", "launch", "--config_file", "launch/zero3.yaml", "--num_processes", "2", "-m"]
    return [
        *prefix,
        "distill",
        "train",
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--save_steps",
        "1",
        "--save_total_limit",
        "null",
        "--logging_steps",
        "1",
        "--eval_steps",
        "null",
        "--report_to",
        "[none]",
        "--per_device_train_batch_size",
        "2",
        "--model.teacher",
        str(teacher),
        "--model.student",
        str(student),
        "--data.train_file",
        str(data),
        "--data.eval_fraction",
        "0",
        "--loss.terms",
        "{forward_kl: 1}",
    ]


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def time_to_step(command: list[str], metrics: Path, step: int) -> float:
    """Seconds from process start until ``step`` is logged (then the process is left to finish)."""
    log = metrics.with_name("resume.log")
    started = time.perf_counter()
    # stderr to a file, not a pipe: an unread pipe fills up with the ranks' warnings and blocks them.
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        while True:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if any(json.loads(line)["step"] == step for line in lines if line):
                elapsed = time.perf_counter() - started
                break
            if process.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.05)
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"resumed run failed with exit code {process.returncode}: {log.read_text()[-3000:]}")
    return elapsed


def save_seconds(log: str) -> float:
    """The slowest of the run's saves, from the `saved <dir> in X s` lines distill.training.checkpoint logs."""
    times = [float(m) for m in re.findall(r"saved \S+checkpoint-\d+ in ([0-9.]+) s", log)]
    if not times:
        raise RuntimeError("no save time logged")
    return max(times)


def measure(launcher: str, name: str, hidden: int, layers: int, root: Path) -> dict[str, float]:
    teacher, student, params = build_models(root, hidden, layers)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "completion": t}) + "\n" for t in CORPUS[:16]))
    out = root / "run"
    fresh = subprocess.run(
        train_command(launcher, teacher, student, data, out, 2), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True
    )
    if fresh.returncode != 0:
        raise RuntimeError(fresh.stderr[-3000:])
    size = directory_bytes(out / "checkpoint-2")
    resume = train_command(launcher, teacher, student, data, out, 3) + ["--resume", "auto"]
    return {
        "student": name,
        "parameters": params,
        "checkpoint_mb": size / 1e6,
        "bytes_per_parameter": size / params,
        "save_s": save_seconds(fresh.stderr),
        "launch_to_first_resumed_step_s": time_to_step(resume, out / "metrics.jsonl", 3),
    }


def manifest_cost(megabytes: list[float], repeats: int = 5) -> None:
    """Seconds to write manifest.json with content hashes vs sizes only (the earlier manifest), on a checkpoint
    directory of random files just written (still in the page cache, as after save_state): 12 bytes per parameter
    as model.safetensors 1/3 + optimizer.bin 2/3, plus small files."""
    from distill.training import checkpoint as ckpt

    print(f"{'ckpt MB':>8} {'sizes only s':>13} {'with xxh3_128 s':>16} {'hash GB/s':>10}")
    for mb in megabytes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            total = int(mb * 1e6)
            for name, share in (("model.safetensors", 1 / 3), ("optimizer.bin", 2 / 3)):
                (root / name).write_bytes(os.urandom(int(total * share)))
            for name in ("scheduler.bin", "random_states_0.pkl", "trainer_state.json", "config.yaml"):
                (root / name).write_bytes(os.urandom(2000))
            sizes, hashed = [], []
            for _ in range(repeats):
                started = time.perf_counter()
                json.dumps({n.name: n.stat().st_size for n in ckpt._checkpoint_files(root)})
                sizes.append(time.perf_counter() - started)
                started = time.perf_counter()
                ckpt._write_manifest(root)
                hashed.append(time.perf_counter() - started)
            fastest = min(hashed)
            print(f"{mb:>8.1f} {min(sizes):>13.4f} {fastest:>16.4f} {total / fastest / 1e9:>10.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", choices=["single", "zero3"], default="single")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--manifest-mb", nargs="+", type=float, help="only time the manifest on checkpoints of these MB"
    )
    args = parser.parse_args()
    if args.manifest_mb:
        manifest_cost(args.manifest_mb)
        return
    rows = []
    for name in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(args.launcher, name, *SIZES[name], Path(tmp)))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nlauncher: {args.launcher}")
    print(f"{'student':>8} {'params':>11} {'ckpt MB':>8} {'B/param':>8} {'save s':>7} {'launch->resumed step s':>23}")
    for r in rows:
        print(
            f"{r['student']:>8} {r['parameters']:>11,} {r['checkpoint_mb']:>8.1f} {r['bytes_per_parameter']:>8.1f} "
            f"{r['save_s']:>7.2f} {r['launch_to_first_resumed_step_s']:>23.1f}"
        )


if __name__ == "__main__":
    main()
