"""Ctrl-C is a one-line stop for every command: SIGINT sent to a real process held mid-write (tests/kill_points)
ends it with exit 130 and one line, no traceback, and nothing half-written left where a later run would trust it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kd_core.commands import EXIT_INTERRUPTED, INTERRUPTED_LINE
from tests.conftest import REPO_ROOT, addition_rows, interrupt_at, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
DISTILL = [sys.executable, "-m", "distill"]


def assert_one_line_stop(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == EXIT_INTERRUPTED, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == INTERRUPTED_LINE


def no_temporaries(root) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


def test_prune_interrupted_while_publishing_leaves_no_model(model_dirs, tmp_path):
    out = tmp_path / "pruned"
    command = [
        *DISTILL,
        "prune",
        "--model",
        str(model_dirs["teacher"]),
        "--output_dir",
        str(out),
        "--depth.num_layers",
        "2",
        "--depth.method",
        "uniform",
    ]
    assert_one_line_stop(interrupt_at(command, ENV, f"publish:{out.name}"))
    assert not out.exists() and no_temporaries(tmp_path)


def test_precompute_interrupted_before_its_metadata_is_not_trusted_and_reruns(model_dirs, tmp_path):
    from distill.offline.store import LogitStore
    from kd_core.config import ConfigError

    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(12))
    out = tmp_path / "store"
    command = [
        *DISTILL,
        "precompute",
        "--teacher",
        str(model_dirs["teacher"]),
        "--output_dir",
        str(out),
        "--k",
        "8",
        "--data.train_file",
        str(data),
        "--data.eval_fraction",
        "0.0",
    ]
    # Held just after the temporary of store.json is reserved (outside the writer's own clean-up, by the test hook's
    # design): the marker still says running, so the rerun removes what is there and writes the store again.
    assert_one_line_stop(interrupt_at(command, ENV, "reserve:store.json"))
    assert not (out / "store.json").exists()
    with pytest.raises(ConfigError, match="not found"):
        LogitStore(out)
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0 and "interrupted precompute" in rerun.stderr, rerun.stderr[-3000:]
    LogitStore(out)
    assert no_temporaries(tmp_path)


def test_export_and_train_interrupted_leave_no_half_model(model_dirs, train_file, tmp_path):
    run = tmp_path / "run"
    train = [
        *DISTILL,
        "train",
        "--output_dir",
        str(run),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--save_steps",
        "1",
        "--eval_steps",
        "null",
        "--report_to",
        "[none]",
        "--model.teacher",
        str(model_dirs["teacher"]),
        "--model.student",
        str(model_dirs["student"]),
        "--data.train_file",
        str(train_file),
        "--data.eval_fraction",
        "0",
        "--loss.terms",
        "{forward_kl: 1.0}",
    ]
    # Held while publishing the second checkpoint: the first is whole, the second never appears half-written.
    assert_one_line_stop(interrupt_at(train, ENV, "publish:checkpoint-2"))
    # The unfinished save stays as .checkpoint-2.tmp, which nothing reads (distill/training/checkpoint.py).
    assert (run / "checkpoint-1").is_dir() and not (run / "checkpoint-2").exists()
    assert (run / "latest").read_text().strip() == "checkpoint-1"
    target = tmp_path / "exported"
    export = [*DISTILL, "export", "--checkpoint", str(run / "checkpoint-1"), "--output_dir", str(target)]
    assert_one_line_stop(interrupt_at(export, ENV, f"publish:{target.name}"))
    assert not target.exists() and not list(tmp_path.glob(".exported*"))  # the staging directory is removed
    done = subprocess.run(export, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
