"""data_gen.rouge against rouge_score itself: same tokens, same float scores, same greedy decisions."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer, tokenizers

from data_gen.rouge import NoveltyIndex, rouge_l_f, rouge_tokens
from tests.conftest import FIXTURES, REPO_ROOT

FIXTURE = FIXTURES / "novelty_instructions.jsonl"
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

TRICKY = [
    "",
    "   \n\t ",
    "!!! ??? ...",
    "Hello, World!",
    "hello world",
    "HELLO   world\n\nagain",
    "e-mail me at a.b@c.com (ASAP)",
    "x86_64 vs arm64; 3.14159 and 1,000,000",
    "naïve café déjà vu über straße",
    "\u212a is the Kelvin sign; \u0130stanbul has a dotted I",
    "今日は良い天気ですね 123 abc",
    "tab\tseparated\tvalues\r\nwindows line",
    "a a a a a b a a a a",
    "b a a a a a a a a a",
    "The the THE tHe",
    "<<48/2=24>>24 clips",
]


def fixture_texts() -> list[str]:
    return [json.loads(line)["instruction"] for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


def reference_score(kept: str, candidate: str) -> float:
    return SCORER.score(kept, candidate)["rougeL"].fmeasure


def test_tokens_match_rouge_score() -> None:
    reference = tokenizers.DefaultTokenizer(use_stemmer=False)
    for text in TRICKY + fixture_texts():
        assert rouge_tokens(text) == reference.tokenize(text), text


def test_scores_are_the_same_floats_as_rouge_score() -> None:
    texts = TRICKY + fixture_texts()
    for a in texts:
        for b in texts:
            expected = reference_score(a, b)
            assert rouge_l_f(rouge_tokens(a), rouge_tokens(b)) == expected, (a, b)
            assert rouge_l_f(rouge_tokens(b), rouge_tokens(a)) == expected, (a, b)  # symmetric, bit for bit


def test_lcs_on_long_repetitive_sequences() -> None:
    # Small vocabularies make many repeated tokens; lengths past 64 exercise multi-word Python integers.
    rng = random.Random(0)
    for _ in range(300):
        vocab = [f"w{i}" for i in range(rng.randint(1, 6))]
        a = " ".join(rng.choices(vocab, k=rng.randint(0, 150)))
        b = " ".join(rng.choices(vocab, k=rng.randint(0, 150)))
        assert rouge_l_f(rouge_tokens(a), rouge_tokens(b)) == reference_score(a, b)


def score_matrix(texts: list[str]) -> list[list[float]]:
    """matrix[i][j] = rouge_score F of texts[i] (candidate) against texts[j] (kept), for j < i."""
    return [[reference_score(texts[j], texts[i]) for j in range(i)] for i in range(len(texts))]


def greedy_scan(matrix: list[list[float]], threshold: float) -> list[tuple[bool, int | None, float]]:
    """The plain Self-Instruct filter: score every kept text, argmax first on ties, keep iff max <= threshold."""
    kept: list[int] = []
    decisions = []
    for i in range(len(matrix)):
        scores = [matrix[i][j] for j in kept]
        if scores:
            best = int(np.argmax(scores))
            decision = (max(scores) <= threshold, best, scores[best])
        else:
            decision = (True, None, 0.0)
        decisions.append(decision)
        if decision[0]:
            kept.append(i)
    return decisions


def check_index_against_scan(texts: list[str], thresholds: tuple[float, ...]) -> int:
    """Runs add_if_novel / is_novel / most_similar against the scan for each threshold; returns the drops seen."""
    matrix = score_matrix(texts)
    drops = 0
    for threshold in thresholds:
        expected = greedy_scan(matrix, threshold)
        index = NoveltyIndex(threshold)
        for text, want in zip(texts, expected):
            assert index.is_novel(text) == want[0], (threshold, text)
            assert index.most_similar(text) == want[1:], (threshold, text)
            assert index.add_if_novel(text) == want, (threshold, text)
            drops += not want[0]
        assert len(index) == sum(w[0] for w in expected)
    return drops


def test_index_equals_scan_on_fixture() -> None:
    drops = check_index_against_scan(fixture_texts(), (0.0, 0.3, 0.5, 0.7, 1.0))
    assert drops > 20  # the fixture is built with near-duplicates, so the comparison covers both outcomes


def test_index_equals_scan_on_real_instructions(shared_data: Path) -> None:
    seeds = [json.loads(line)["instruction"] for line in (shared_data / "self_instruct_seed_tasks.jsonl").open()]
    user = [
        json.loads(line)["instruction"]
        for line in (shared_data / "self_instruct_user_oriented_instructions.jsonl").open()
    ]
    texts = seeds + user[:85]
    # Near-duplicates as a generator makes them: a few real instructions again with a word dropped or reworded.
    rng = random.Random(1)
    for text in rng.sample(seeds, 25):
        words = text.split()
        del words[rng.randrange(len(words))]
        texts.insert(rng.randrange(len(texts)), " ".join(words))
    assert len(texts) == 285
    drops = check_index_against_scan(texts, (0.4, 0.7))
    assert drops >= 25


def test_edge_cases_and_threshold_rule() -> None:
    index = NoveltyIndex(0.5)
    assert len(index) == 0
    assert index.most_similar("anything") == (None, 0.0)
    assert index.is_novel("anything")
    assert index.add("a b") == 0
    assert index.add("a b") == 1  # add is unconditional
    assert index.most_similar("a b") == (0, 1.0)  # ties go to the lowest index, as numpy.argmax does
    assert index.most_similar("zzz") == (0, 0.0)  # nothing shared: every score is 0
    assert index.most_similar("?!") == (0, 0.0)  # no tokens at all: rouge_score scores 0
    # "a c" against "a b": LCS 1 of 2 and 2 tokens, F exactly 0.5; the rule is "novel iff score <= threshold".
    assert index.is_novel("a c")
    assert NoveltyIndex(0.0).is_novel("a b")  # an empty index has nothing to be similar to
    strict = NoveltyIndex(0.49)
    strict.add("a b")
    assert not strict.is_novel("a c")
    assert strict.add_if_novel("a c") == (False, 0, 0.5)
    assert index.add_if_novel("a c") == (True, 0, 0.5)
    assert len(index) == 3 and len(strict) == 1
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            NoveltyIndex(bad)


def test_docs_example() -> None:
    """The example of docs/novelty.md, value for value."""
    assert rouge_tokens("Add 2 numbers!") == ["add", "2", "numbers"]
    assert rouge_l_f(["a", "b"], ["a", "c"]) == 0.5
    index = NoveltyIndex(threshold=0.7)
    assert index.add("Write a poem about the sea.") == 0
    assert not index.is_novel("Write a poem about a sea.")
    assert index.most_similar("Write a poem about a sea.") == (0, 5 / 6)
    assert index.add_if_novel("Summarize this article.") == (True, 0, 0.0)
    assert len(index) == 2


def test_benchmark_script_runs(shared_data: Path) -> None:
    """bench/novelty.py on a small head-to-head: it asserts identical kept sets itself and reports the speedup."""
    script = REPO_ROOT / "bench" / "novelty.py"
    args = [sys.executable, str(script), "--data", str(shared_data), "--compare", "20", "--seeds", "40", "--skip-full"]
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["compare_texts"] == 60 and 0 < figures["kept"] <= 60
    assert figures["scan_cpu_s"] > 0 and figures["speedup_is_novel"] > 0
