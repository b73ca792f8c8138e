"""The shipped feature-distillation config runs through ``distill train`` and logs every term separately."""

from __future__ import annotations

import json

from distill.training.train import main
from tests.conftest import REPO_ROOT


def run_args(model_dirs, train_file, out) -> list[str]:
    return [
        "--config",
        str(REPO_ROOT / "configs" / "feature_distill.yaml"),
        "--model.teacher",
        str(model_dirs["teacher"]),
        "--model.student",
        str(model_dirs["student"]),
        "--data.train_file",
        str(train_file),
        "--data.eval_fraction",
        "0",
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--gradient_accumulation_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--report_to",
        "[none]",
        "--save_steps",
        "100",
        "--data.max_length",
        "32",
    ]


def test_feature_config_trains_and_logs_each_term(model_dirs, train_file, tmp_path):
    out = tmp_path / "run"
    assert main(run_args(model_dirs, train_file, out)) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    for term in ("forward_kl", "hidden_mse", "attention_transfer", "rkd_angle"):
        assert any(term in key for key in keys), (term, sorted(keys))


def test_feature_config_refuses_sdpa_and_batch_of_one(model_dirs, train_file, tmp_path, capsys):
    from kd_core.commands import run_command

    out = tmp_path / "sdpa"
    assert run_command(main, run_args(model_dirs, train_file, out) + ["--model.attn_implementation", "sdpa"]) == 2
    assert "attn_implementation: eager" in capsys.readouterr().err
    assert not out.exists()  # refused before anything is written
    out = tmp_path / "one"
    assert run_command(main, run_args(model_dirs, train_file, out) + ["--per_device_train_batch_size", "1"]) == 2
    assert "rkd_angle" in capsys.readouterr().err
    assert not out.exists()
