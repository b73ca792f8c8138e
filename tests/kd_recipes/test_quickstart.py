"""``distill quickstart`` end to end on a SMALL config: interrupted by SIGKILL mid-stage, resumed, finished; the report,
plots and refusals checked on the result.

The whole pipeline runs once per session (module fixture) as real subprocesses of the command itself: the first run
is killed while the last training stage (the on-policy student, which samples) is training, the second run must skip
every finished stage, resume the killed one from its checkpoint (sampler state included) and write the report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, slowed_steps, tree_digest

# Tiny sizes and few steps, on the easy problems of 1-3 steps: the teacher still memorises some training problems, so
# data-gen cot keeps rationales.
SMALL = [
    "--problem_steps",
    "[1, 3]",
    "--problem_start",
    "20",
    "--problem_amount",
    "15",
    "--on_policy.steps",
    "8",
    "--on_policy.max_new_tokens",
    "16",
    "--on_policy.terms",
    "{jsd: 1.0}",
    "--num_train",
    "32",
    "--num_eval",
    "8",
    "--vocab_size",
    "300",
    "--teacher_layers",
    "2",
    "--teacher_hidden",
    "64",
    "--teacher_steps",
    "120",
    "--student_layers",
    "1",
    "--student_intermediate_size",
    "128",
    "--student_steps",
    "12",
    "--batch_size",
    "8",
    "--learning_rate",
    "1e-2",
    "--cot_samples",
    "2",
    "--max_new_tokens",
    "32",
    "--lora.enabled",
    "true",
    "--lora.r",
    "4",  # students with LoRA (the default, full fine-tuning, is the README run)
]
COMPARED = ["teacher", "pruned", "labels", "rationales", "distilled", "on_policy"]
TRAINED = ["teacher", "labels", "rationales", "distilled", "on_policy"]


def quickstart(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distill", "quickstart", "--output_dir", str(out), *SMALL, *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("qs") / "run"
    logs = out.parent
    with open(logs / "first.log", "w") as log:
        first = subprocess.Popen(
            quickstart(out), cwd=REPO_ROOT, env=slowed_steps(environment(), 0.05), stdout=log, stderr=subprocess.STDOUT
        )
        # Kill once the on-policy student has written its first checkpoint, i.e. in the middle of that stage.
        deadline = time.time() + 600  # a guard against a hung run, far above a busy machine's pace
        while time.time() < deadline and first.poll() is None:
            if list((out / "students" / "on_policy").glob("checkpoint-*")):
                break
            time.sleep(0.05)
        killed_mid_stage = first.poll() is None and not (out / "students" / "on_policy" / "summary.json").exists()
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = subprocess.run(
        quickstart(out), cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=300, check=False
    )
    assert second.returncode == 0, (logs / "first.log").read_text()[-3000:] + second.stdout[-3000:] + second.stderr
    return {"out": out, "killed_mid_stage": killed_mid_stage, "log": second.stdout + second.stderr}


def test_kill_then_rerun_resumes_the_interrupted_stage(finished):
    assert finished["killed_mid_stage"], "the first run finished the on-policy stage before it could be killed"
    log = finished["log"]
    assert "resuming the unfinished run" in log
    for stage in ("teacher", "cot", "labels", "rationales", "distilled"):  # finished stages are not redone
        assert f"{stage}: finished earlier, skipped" in log
    assert f"resumed from {finished['out'] / 'students' / 'on_policy'}" in log  # the killed stage continues
    rows = [
        json.loads(line)
        for line in (finished["out"] / "students" / "on_policy" / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(row["step"] for row in rows) == 8
    # every batch was sampled by the student, at most on_policy.max_new_tokens tokens, and trained with the jsd term
    train_rows = [row for row in rows if "train/loss" in row]
    assert train_rows and all(row["train/on_policy/sampled_fraction"] == 1.0 for row in train_rows)
    assert all(0 < row["train/on_policy/sampled_length"] <= 16 and "train/jsd" in row for row in train_rows)
    config = (finished["out"] / "students" / "on_policy" / "config.yaml").read_text()
    assert "students/rationales/final" in config  # continued from the rationale-trained student


def test_report_compares_every_model(finished):
    out = finished["out"]
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    for name in COMPARED:
        assert f"| {name} |" in markdown
        figures = report["results"][name]
        assert 0.0 <= figures["accuracy"] <= 1.0
        assert figures["parameters"] > 0 and figures["tokens_per_second"] > 0 and figures["perplexity"] >= 1.0
        assert figures["records"] == 8
    assert report["results"]["teacher"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the teacher against itself
    assert report["results"]["teacher"]["parameters"] > report["results"]["pruned"]["parameters"]
    assert report["verdict"] in markdown and "fine-tuning on gold labels only" in report["verdict"]
    assert "on-policy" in report["verdict"] and "teacher" in report["verdict"]  # what the on-policy student did
    assert report["cot"]["rows"] >= 1
    assert report["config"]["lora"]["enabled"] and "(LoRA)" in markdown
    assert (out / "students" / "distilled" / "final" / "model.safetensors").exists()  # merged LoRA export
    # accuracy is computed from the saved generations, not taken from anywhere else
    for name in COMPARED:
        samples = json.loads((out / "eval" / f"{name}.json").read_text())["samples"]
        assert report["results"][name]["accuracy"] == sum(s["correct"] for s in samples) / len(samples)
    assert set(report["timings"]) >= {"teacher", "cot", "prune", "labels", "rationales", "distilled", "on_policy"}


def test_plots_are_valid_pngs(finished):
    import matplotlib.image

    plots = finished["out"] / "plots"
    files = [plots / "accuracy.png"] + [plots / run / "train_terms.png" for run in TRAINED]
    for path in files:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[0] > 100
        assert f"plots/{path.relative_to(plots)}" in (finished["out"] / "report.md").read_text()


def test_rerun_into_a_finished_run_is_refused(finished, capsys):
    from kd_recipes.cli import distill_main as cli

    before = (finished["out"] / "report.json").stat().st_mtime
    assert cli(quickstart(finished["out"])[3:]) == 2  # the same command line, in-process
    err = capsys.readouterr().err
    assert "holds a finished quickstart" in err and "--overwrite" in err
    assert (finished["out"] / "report.json").stat().st_mtime == before


def test_other_directories_and_settings_are_refused(tmp_path):
    from kd_core.config import ConfigError
    from kd_recipes.quickstart import QuickstartConfig, prepare_output_dir

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a quickstart output directory"):
        prepare_output_dir(QuickstartConfig(output_dir=str(foreign)))
    assert (foreign / "notes.txt").read_text() == "mine"

    unfinished = tmp_path / "unfinished"
    prepare_output_dir(QuickstartConfig(output_dir=str(unfinished), teacher_steps=10)).release()
    with pytest.raises(ConfigError, match="other settings \\(teacher_steps\\)"):
        prepare_output_dir(QuickstartConfig(output_dir=str(unfinished), teacher_steps=20))
    with prepare_output_dir(QuickstartConfig(output_dir=str(unfinished), teacher_steps=10)):  # same settings: resume
        with pytest.raises(ConfigError, match="is being written by pid"):  # one writer at a time
            prepare_output_dir(QuickstartConfig(output_dir=str(unfinished), teacher_steps=10))
    prepare_output_dir(QuickstartConfig(output_dir=str(unfinished), teacher_steps=20, overwrite=True)).release()
    assert "teacher_steps: 20" in (unfinished / "config.yaml").read_text()


def test_overwrite_never_deletes_a_directory_that_is_not_a_quickstart(tmp_path, capsys):
    """Issue 15, case 1: `distill quickstart --output_dir DIR --overwrite` used to delete any non-empty DIR although
    the refusal that sent the user there said DIR "is not a quickstart directory"; now DIR stays byte-identical,
    whether it is a user's folder or another command's output (a training run, recognised without a marker)."""
    from kd_recipes.cli import distill_main as cli

    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "sub" / "data.bin").write_bytes(b"\x00\x01")
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "latest").write_text("checkpoint-2\n")
    for directory, held in ((foreign, ""), (run, "files not written by this command")):
        before = tree_digest(directory)
        assert cli(["quickstart", "--output_dir", str(directory), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "not a quickstart output directory" in err and held in err, err
        assert tree_digest(directory) == before


def test_overwrite_removes_only_what_the_quickstart_wrote(tmp_path, capsys):
    from kd_core import ownership
    from kd_recipes.quickstart import OUTPUT, QuickstartConfig, prepare_output_dir

    root = tmp_path / "qs"
    prepare_output_dir(QuickstartConfig(output_dir=str(root), teacher_steps=10)).release()
    assert json.loads((root / ownership.MARKER).read_text())["command"] == OUTPUT.command
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("{}\n")
    (root / "my_notes.txt").write_text("mine")
    prepare_output_dir(QuickstartConfig(output_dir=str(root), teacher_steps=20, overwrite=True)).release()
    assert "removed the earlier quickstart's" in capsys.readouterr().err
    assert not (root / "data").exists() and (root / "my_notes.txt").read_text() == "mine"
    assert "teacher_steps: 20" in (root / "config.yaml").read_text()


def test_shipped_config_equals_the_defaults():
    from kd_core.config import from_dict, load_yaml
    from kd_recipes.quickstart import QuickstartConfig

    shipped = REPO_ROOT / "configs" / "quickstart.yaml"
    assert shipped.read_text().splitlines()[0] == "# distill quickstart"
    assert from_dict(QuickstartConfig, load_yaml(shipped)) == QuickstartConfig()


def test_on_policy_and_problem_settings_are_validated():
    from kd_recipes.quickstart import OnPolicyStudent, QuickstartConfig

    with pytest.raises(ValueError, match="divergence to the teacher"):
        OnPolicyStudent(terms={"ce": 1.0})  # ce is off on the student's own samples: nothing would train
    with pytest.raises(ValueError, match="did you mean 'reverse_kl'"):
        OnPolicyStudent(terms={"reverse_kll": 1.0})  # refused before any stage runs
    with pytest.raises(ValueError, match="student_fraction"):
        OnPolicyStudent(student_fraction=0.0)
    with pytest.raises(ValueError, match="temperature"):
        OnPolicyStudent(temperature=-1.0)
    with pytest.raises(ValueError, match="problem_steps"):
        QuickstartConfig(problem_steps=[3, 2])
    settings = OnPolicyStudent(student_fraction=0.5, max_new_tokens=20).settings()
    assert (settings.student_fraction, settings.teacher_fraction, settings.max_new_tokens) == (0.5, 0.0, 20)
