"""Benchmark: training data at scale. Time to the first micro-batch, resident memory, the second run's start, and the
cost of each later micro-batch, for 20K / 200K / 2M-row JSON lines files, through the real data path
(``build_datasets`` -> ``BatchStream`` -> ``collate``), against the path before the tokenized cache (data held in
Python lists, the epoch's permutation rebuilt as a list per micro-batch).

    python bench/data_scale.py [--rows 20000 200000 2000000] [--old_up_to 200000] [--num_proc 2] [--workdir DIR]

Rows are GSM8K train questions and worked answers (../shared/data, 7,473 pairs, cycled, each prompt numbered so no two
rows are equal) as ``prompt``/``completion``, tokenized with the chat template by a byte-level BPE of 8,192 tokens
trained on them (no download; about 150 tokens a row, so 2M rows are about 300M tokens). Every file is a prefix of
the same row sequence. Each measurement is a fresh process: ``old`` (the data modules of ``--old_ref``), ``cold``
(the new path with an empty cache: it tokenizes, with ``--num_proc`` worker processes), ``warm`` (the new path again:
it maps the cache). Per process: seconds from the tokenizer being loaded to the first collated micro-batch; resident
memory of the process (VmRSS, split into anonymous memory and mapped file pages) after that batch and at its peak,
each minus the process's own RSS before the data step (with ``datasets`` and ``pyarrow`` already imported, in both
paths); the median time of one later micro-batch (indices, rows,
collate) over 200. The tokenizing worker processes of ``cold`` are not in its RSS: they exit when done.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
BATCH = 8


def pairs() -> list[tuple[str, str]]:
    return [(r["question"], r["answer"]) for r in map(json.loads, GSM8K.read_text().splitlines())]


def write_rows(path: Path, count: int) -> None:
    base = pairs()
    with open(path, "w") as handle:
        for i in range(count):
            question, answer = base[i % len(base)]
            handle.write(json.dumps({"prompt": f"Problem {i}: {question}", "completion": answer}) + "\n")


def make_tokenizer(directory: Path) -> None:
    from distill.student.tiny import train_tokenizer

    texts = [q + "\n" + a for q, a in pairs()]
    train_tokenizer(texts, vocab_size=8192).save_pretrained(directory)


def status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM (peak) of this process, in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def old_modules(ref: str):
    """``datasets`` and ``batching`` of ``ref``, imported from ``git show`` under other names."""
    loaded = []
    for name in ("datasets", "batching"):
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{ref}:distill/data/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        path = Path(tempfile.mkdtemp()) / f"old_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"old_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded


def child(args: argparse.Namespace) -> None:
    import datasets  # noqa: F401 (imported by both paths' callers: its libraries' pages are not data)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.variant == "old":
        data_module, batching = old_modules(args.old_ref)
        settings = data_module.DataSettings(train_file=args.data, eval_fraction=0.0)
    else:
        from distill.data import batching
        from distill.data import datasets as data_module

        settings = data_module.DataSettings(
            train_file=args.data, eval_fraction=0.0, cache_dir=args.cache, num_proc=args.num_proc
        )
    before = status()
    started = time.perf_counter()
    train, _ = data_module.build_datasets(settings, tokenizer, 0)
    stream = batching.BatchStream(len(train), BATCH, 1, 0, 0)
    data_module.collate([train[i] for i in stream.next_indices()], tokenizer.pad_token_id)
    first = time.perf_counter() - started
    after = status()
    per_batch = []
    for _ in range(200):
        tick = time.perf_counter()
        data_module.collate([train[i] for i in stream.next_indices()], tokenizer.pad_token_id)
        per_batch.append(time.perf_counter() - tick)
    if args.variant == "old":
        tokens = sum(len(e["input_ids"]) for e in train.examples)
    else:
        import pyarrow.compute as pc

        tokens = pc.sum(pc.list_value_length(train.table.data.column("input_ids"))).as_py()
    print(
        json.dumps(
            {
                "examples": len(train),
                "tokens": tokens,
                "first_batch_s": round(first, 2),
                "rss_mb": round(after["VmRSS"] - before["VmRSS"]),
                "anon_mb": round(after["RssAnon"] - before["RssAnon"]),
                "file_mb": round(after["RssFile"] - before["RssFile"]),
                "peak_mb": round(after["VmHWM"] - before["VmRSS"]),
                "batch_ms": round(1000 * statistics.median(per_batch), 3),
                "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        )
    )


def measure(args: argparse.Namespace, variant: str, data: Path, cache: Path, tokenizer: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--variant",
        variant,
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--tokenizer",
        str(tokenizer),
        "--num_proc",
        str(args.num_proc),
        "--old_ref",
        args.old_ref,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    parser.add_argument(
        "--old_up_to",
        type=int,
        default=200_000,
        help="Run the old path up to this many rows (it holds about 72 bytes a token: 2M rows would need about 20 GB).",
    )
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--old_ref", default="3b9972c", help="The commit whose data path is `old`.")
    parser.add_argument("--workdir", default=None, help="Where the files go (default: a temporary folder, removed).")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="cold", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="data_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        make_tokenizer(work / "tokenizer")
        for rows in args.rows:
            data = work / f"rows_{rows}.jsonl"
            tick = time.perf_counter()
            write_rows(data, rows)
            print(
                f"{rows} rows: {data.stat().st_size / 1e6:.0f} MB written in {time.perf_counter() - tick:.0f} s",
                flush=True,
            )
            cache = work / f"cache_{rows}"
            variants = (["old"] if rows <= args.old_up_to else []) + ["cold", "warm"]
            for variant in variants:
                result = measure(args, variant, data, cache, work / "tokenizer")
                print(json.dumps({"rows": rows, "variant": variant, **result}), flush=True)
            shutil.rmtree(cache)
            data.unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
