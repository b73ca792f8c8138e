"""``data-gen dedup`` end to end in a subprocess: outputs against a rouge_score scan, and every refused input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rouge_score import rouge_scorer

from tests.conftest import FIXTURES, REPO_ROOT

FIXTURE = FIXTURES / "novelty_instructions.jsonl"


def run_dedup(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "data_gen", "dedup", *args],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def reference_dedup(
    records: list[dict], field: str, threshold: float
) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Greedy scan with rouge_score: (kept positions, [(dropped position, most similar kept position, score)])."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept: list[int] = []
    dropped = []
    for i, record in enumerate(records):
        scores = [scorer.score(records[k][field], record[field])["rougeL"].fmeasure for k in kept]
        if scores and max(scores) > threshold:
            best = scores.index(max(scores))  # first maximum, like numpy.argmax
            dropped.append((i, kept[best], scores[best]))
        else:
            kept.append(i)
    return kept, dropped


@pytest.mark.parametrize("threshold", [0.7, 0.4])
def test_dedup_end_to_end(tmp_path: Path, threshold: float) -> None:
    # A blank line in the middle: it holds no record but still counts for line numbers.
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    lines.insert(5, "")
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    line_numbers = [n for n, line in enumerate(lines, start=1) if line]
    raw_lines = [line for line in lines if line]
    records = [json.loads(line) for line in raw_lines]
    out = tmp_path / "out"

    result = run_dedup(str(source), "--field", "instruction", "--threshold", str(threshold), "--output-dir", str(out))
    assert result.returncode == 0, result.stderr

    kept, dropped = reference_dedup(records, "instruction", threshold)
    assert dropped, "the fixture must produce drops at this threshold"
    assert (out / "kept.jsonl").read_text(encoding="utf-8").splitlines() == [raw_lines[i] for i in kept]
    annotations = [json.loads(line) for line in (out / "dropped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert annotations == [
        {
            "line": line_numbers[i],
            "record": records[i],
            "most_similar_line": line_numbers[k],
            "most_similar": records[k],
            "rouge_l": score,
        }
        for i, k, score in dropped
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["records"], summary["kept"], summary["dropped"]) == (len(records), len(kept), len(dropped))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["threshold"] == threshold and config["field"] == "instruction" and config["overwrite"] is False
    assert f"kept {len(kept)} of {len(records)}" in result.stdout


def test_dedup_refuses_non_empty_output_dir_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.jsonl").write_text("precious\n")
    result = run_dedup(str(FIXTURE), "--field", "instruction", "--output-dir", str(out))
    assert result.returncode == 2
    assert "not empty" in result.stderr and "--overwrite" in result.stderr
    assert (out / "kept.jsonl").read_text() == "precious\n"

    result = run_dedup(str(FIXTURE), "--field", "instruction", "--output-dir", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (out / "kept.jsonl").read_text() != "precious\n"
    assert sorted(p.name for p in out.iterdir()) == [
        ".kd_owner.json",
        "config.yaml",
        "dropped.jsonl",
        "kept.jsonl",
        "summary.json",
    ]


BAD_INPUTS = {
    "missing file": (None, [], "file not found"),
    "not json": ('{"instruction": "a"}\n{"instruction": "b"}\n{oops\n', [], ":3: not valid JSON"),
    "not an object": ('{"instruction": "a"}\n["instruction"]\n', [], ":2: expected a JSON object"),
    "missing field": ('{"instruction": "a"}\n{"prompt": "b"}\n', [], ":2: record has no field 'instruction'"),
    "non-string field": ('{"instruction": 7}\n', [], ":1: field 'instruction' must be a string, got int"),
    "empty input": ("\n\n", [], "no records"),
    "not utf-8": ('{"instruction": "a"}\n{"instruction": "caf\xe9"}\n'.encode("latin-1"), [], ":2: not UTF-8 text"),
    "threshold above 1": ('{"instruction": "a"}\n', ["--threshold", "1.5"], "threshold: expected a number in [0, 1]"),
    "threshold below 0": ('{"instruction": "a"}\n', ["--threshold", "-0.1"], "threshold: expected a number in [0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_dedup_bad_input_exits_2_and_writes_nothing(tmp_path: Path, case: str) -> None:
    content, extra, message = BAD_INPUTS[case]
    source = tmp_path / "in.jsonl"
    if isinstance(content, bytes):
        source.write_bytes(content)
    elif content is not None:
        source.write_text(content)
    # An existing output dir with --overwrite: a bad input must still leave its files alone.
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.jsonl").write_text("earlier run\n")
    result = run_dedup(str(source), "--field", "instruction", "--output-dir", str(out), "--overwrite", *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert [p.name for p in out.iterdir()] == ["kept.jsonl"]
    assert (out / "kept.jsonl").read_text() == "earlier run\n"
    # And a fresh output dir is not even created.
    result = run_dedup(str(source), "--field", "instruction", "--output-dir", str(tmp_path / "new"), *extra)
    assert result.returncode == 2 and not (tmp_path / "new").exists()
