"""Benchmark: the greedy ROUGE-L novelty filter, NoveltyIndex vs a plain rouge_score scan, in one run.

    python bench/novelty.py                      # 2,000 GSM8K train questions + 175 seeds, then all ~9,000 texts
    python bench/novelty.py --compare 500 --skip-full   # a quick check

Part 1 (``--compare`` GSM8K train questions plus the 175 Self-Instruct seed instructions, in that order): the
baseline is what Self-Instruct does, ``RougeScorer(['rougeL']).score(kept, candidate)`` against every kept text per
candidate, keeping a candidate iff its max score <= threshold. NoveltyIndex runs the same greedy filter twice:
``add_if_novel`` (decision plus exact most similar text and score, asserted equal to the scan's argmax for every
candidate) and ``is_novel`` + ``add`` (decision only, what ``data-gen dedup`` uses for kept records). The kept sets
must be identical; times and speedups are printed.

Part 2: all GSM8K train and test questions plus the seeds (about 9,000 texts) with the index alone (the scan would
take hours).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rouge_score import rouge_scorer

# Runnable as a plain script from a checkout without installing the package.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from data_gen.rouge import NoveltyIndex  # noqa: E402 (after the sys.path line above)

T = TypeVar("T")


def read_field(path: Path, field: str) -> list[str]:
    return [json.loads(line)[field] for line in path.open(encoding="utf-8") if line.strip()]


def scan_filter(texts: list[str], threshold: float) -> tuple[list[int], list[tuple[int | None, float]]]:
    """Self-Instruct's filter: score every kept text with rouge_score. (kept ids, (argmax, max) per candidate)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept: list[int] = []
    best: list[tuple[int | None, float]] = []
    for i, text in enumerate(texts):
        scores = [scorer.score(texts[k], text)["rougeL"].fmeasure for k in kept]
        top = int(np.argmax(scores)) if scores else None
        best.append((top, scores[top] if top is not None else 0.0))
        if not scores or max(scores) <= threshold:
            kept.append(i)
    return kept, best


def index_filter(texts: list[str], threshold: float) -> tuple[list[int], list[tuple[int | None, float]]]:
    """NoveltyIndex.add_if_novel: kept ids and the exact (argmax, max) per candidate."""
    index = NoveltyIndex(threshold)
    kept: list[int] = []
    best: list[tuple[int | None, float]] = []
    for i, text in enumerate(texts):
        is_kept, top, score = index.add_if_novel(text)
        best.append((top, score))
        if is_kept:
            kept.append(i)
    return kept, best


def decision_filter(texts: list[str], threshold: float) -> list[int]:
    """NoveltyIndex.is_novel + add: decisions only."""
    index = NoveltyIndex(threshold)
    kept = []
    for i, text in enumerate(texts):
        if index.is_novel(text):
            index.add(text)
            kept.append(i)
    return kept


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """(fn(*args), wall seconds, CPU seconds of this process).

    The CPU time is what the speedup is computed from: the development machine is shared, and other processes
    stretch wall time unevenly across a run lasting minutes, but not the CPU time this process consumes.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--compare", type=int, default=2000, help="GSM8K train questions in the head-to-head part")
    parser.add_argument("--seeds", type=int, default=175, help="Self-Instruct seed instructions in part 1")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--skip-full", action="store_true", help="skip part 2 (all ~9,000 texts, index only)")
    args = parser.parse_args(argv)

    train = read_field(args.data / "gsm8k_train.jsonl", "question")
    test = read_field(args.data / "gsm8k_test.jsonl", "question")
    seeds = read_field(args.data / "self_instruct_seed_tasks.jsonl", "instruction")
    results: dict[str, float | int] = {}

    texts = train[: args.compare] + seeds[: args.seeds]
    (scan_kept, scan_best), scan_wall, scan_cpu = timed(scan_filter, texts, args.threshold)
    (index_kept, index_best), index_wall, index_cpu = timed(index_filter, texts, args.threshold)
    decision_kept, decision_wall, decision_cpu = timed(decision_filter, texts, args.threshold)
    assert index_kept == scan_kept, "NoveltyIndex.add_if_novel kept a different set than the rouge_score scan"
    assert decision_kept == scan_kept, "NoveltyIndex.is_novel kept a different set than the rouge_score scan"
    assert index_best == scan_best, "most similar text or score differs from the rouge_score scan"
    print(f"part 1: {len(texts)} texts, threshold {args.threshold}: kept {len(scan_kept)} (identical in all three)")
    print("                          CPU s     wall s   speedup (CPU)")
    print(f"  rouge_score scan     {scan_cpu:9.2f}  {scan_wall:9.2f}")
    for name, cpu, wall in (("add_if_novel", index_cpu, index_wall), ("is_novel + add", decision_cpu, decision_wall)):
        print(f"  index {name:<14} {cpu:9.2f}  {wall:9.2f}   {scan_cpu / cpu:8.1f}x")
    results.update(compare_texts=len(texts), kept=len(scan_kept), scan_cpu_s=scan_cpu, scan_wall_s=scan_wall)
    results.update(add_if_novel_cpu_s=index_cpu, is_novel_cpu_s=decision_cpu)
    results.update(speedup_add_if_novel=scan_cpu / index_cpu, speedup_is_novel=scan_cpu / decision_cpu)

    if not args.skip_full:
        texts = train + test + seeds
        (full_kept, _), full_wall, full_cpu = timed(index_filter, texts, args.threshold)
        full_decision_kept, decision_wall, decision_cpu = timed(decision_filter, texts, args.threshold)
        assert full_decision_kept == full_kept
        print(f"part 2: {len(texts)} texts, index only: kept {len(full_kept)}")
        print(f"  index add_if_novel   {full_cpu:9.2f}  {full_wall:9.2f}")
        print(f"  index is_novel + add {decision_cpu:9.2f}  {decision_wall:9.2f}")
        results.update(full_texts=len(texts), full_kept=len(full_kept), full_add_if_novel_cpu_s=full_cpu)
        results.update(full_is_novel_cpu_s=decision_cpu)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
