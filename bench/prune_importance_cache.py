"""How much the importance cache saves: a cold ``distill prune`` (calibration pass) vs the same model and data
with another target shape (cache hit). Prints both times and their ratio, measured in one run.

    python bench/prune_importance_cache.py [--layers 8 --hidden 256 --samples 64 --length 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.student.tiny import tiny_llama, train_tokenizer
from kd_recipes.cli import distill_main as cli

TEXTS = ["The quick brown fox jumps over the lazy dog and keeps running far away.", "What is 12 plus 7? It is 19."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    tokenizer = train_tokenizer(TEXTS * 50, vocab_size=400)
    model = tiny_llama(len(tokenizer), hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4)
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    with (root / "cal.jsonl").open("w") as handle:
        for i in range(args.samples):
            handle.write(json.dumps({"text": " ".join(TEXTS * 20) + f" sample {i}"}) + "\n")
    common = [
        "prune",
        "--model",
        str(root / "teacher"),
        "--calibration.data",
        str(root / "cal.jsonl"),
        "--calibration.max_length",
        str(args.length),
        "--calibration.num_samples",
        str(args.samples),
        "--cache_dir",
        str(root / "cache"),
        "--depth.num_layers",
        str(args.layers // 2),
    ]
    times = []
    for name, heads in (("cold", 4), ("cached", 2)):
        start = time.perf_counter()
        assert cli([*common, "--output-dir", str(root / name), "--width.num_attention_heads", str(heads)]) == 0
        times.append(time.perf_counter() - start)
    print(f"model: {args.layers} layers, hidden {args.hidden}; calibration {args.samples} x {args.length} tokens")
    print(f"cold (calibration pass): {times[0]:.2f} s; cached: {times[1]:.2f} s; speed-up {times[0] / times[1]:.1f}x")


if __name__ == "__main__":
    main()
