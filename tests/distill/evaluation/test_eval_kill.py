"""``distill eval --output`` killed with SIGKILL mid-measurement and while writing its file, then run again: the
file is written once, complete, with the figures of an uninterrupted run, and no temporary file is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import kill_9

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TIMING = ("tokens_per_second", "seconds", "generation_seconds")


def figures(path):
    return {
        k: v
        for k, v in json.loads(path.read_text()).items()
        if k not in TIMING and "second" not in k and "speedup" not in k
    }  # wall-clock figures differ per run


def test_kill_9_mid_run_and_mid_write_then_rerun(model_dirs, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}."}) + "\n"
            for a in range(2, 10)
            for b in range(1, 5)
        )
    )
    out = tmp_path / "figures.json"

    def command(path):
        return [
            sys.executable,
            "-m",
            "distill",
            "eval",
            str(model_dirs["student"]),
            "--data",
            str(data),
            "--teacher",
            str(model_dirs["teacher"]),
            "--max_new_tokens",
            "8",
            "--batch_size",
            "4",
            "--output",
            str(path),
        ]

    reference = subprocess.run(
        command(tmp_path / "reference.json"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    start = time.monotonic()
    assert kill_9(command(out), ENV, until=lambda: time.monotonic() - start > 4)  # loading or measuring
    assert kill_9(command(out), ENV, point=f"reserve:{out.name}")  # the figures computed, the file being written
    assert not out.exists()  # never a truncated file that a later reader (kd report, plots) would take
    assert [p.name for p in tmp_path.glob(f".{out.name}.*.tmp")]  # the killed write's temporary file
    final = subprocess.run(command(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert figures(out) == figures(tmp_path / "reference.json")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
