"""Output ownership of ``distill train`` (kd_core.ownership): a clean restart over a finished run, ``--resume auto``
on a finished run, and refusals of directories that are not training runs; each refusal leaves the tree
byte-identical."""

from __future__ import annotations

import json

import pytest

from distill.training import checkpoint as ckpt
from distill.training.config import OUTPUT
from distill.training.train import main as train_main
from kd_core import ownership
from kd_core.commands import run_command
from tests.conftest import tree_digest


def cli_args(model_dirs, train_file, out, *extra: str) -> list[str]:
    return [
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--save_steps",
        "1",
        "--save_total_limit",
        "2",
        "--eval_steps",
        "null",
        "--logging_steps",
        "1",
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
        "{forward_kl: 0.7, ce: 0.3}",
        *extra,
    ]


def metric_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def finished(model_dirs, train_file, tmp_path):
    """A finished 4-step run (checkpoint-3 and checkpoint-4 kept)."""
    out = tmp_path / "run"
    assert run_command(train_main, cli_args(model_dirs, train_file, out, "--max_steps", "4")) == 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    return out


def test_overwrite_output_dir_starts_a_clean_run_and_resume_auto_then_rewrites_nothing(
    finished, model_dirs, train_file, capsys
):
    """Issue 15, case 2: a shorter run with --overwrite_output_dir over a finished one used to keep the old run's
    higher-numbered checkpoints, delete its own, point `latest` at a missing directory and mix metrics; a later
    --resume auto then resumed the old run and exported its weights."""
    out = finished
    capsys.readouterr()
    assert (
        run_command(
            train_main, cli_args(model_dirs, train_file, out, "--max_steps", "2", "--overwrite_output_dir", "true")
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f"overwrite_output_dir: removed the previous run in {out}" in err and "checkpoint-4" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert (out / ckpt.LATEST_FILE).read_text().strip() == "checkpoint-2"
    assert metric_steps(out) == [1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    marker = json.loads((out / ownership.MARKER).read_text())
    assert marker["command"] == OUTPUT.command and marker["state"] == "finished"

    before = tree_digest(out)  # the same command again, as after a requeue: nothing to do, nothing rewritten
    assert run_command(train_main, cli_args(model_dirs, train_file, out, "--max_steps", "2", "--resume", "auto")) == 0
    assert "holds a finished run (2 steps); nothing to do" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_resume_auto_on_a_finished_run_rewrites_nothing(finished, model_dirs, train_file, capsys):
    """Issue 15, case 4: --resume auto on a finished run used to rewrite summary.json (history emptied),
    config.yaml and final/. Also for a run of an earlier version (no marker: recognised by its checkpoints)."""
    for legacy in (False, True):
        if legacy:
            (finished / ownership.MARKER).unlink()
            assert ownership.owner_of(finished, OUTPUT).command == OUTPUT.command
        before = tree_digest(finished)
        assert (
            run_command(train_main, cli_args(model_dirs, train_file, finished, "--max_steps", "4", "--resume", "auto"))
            == 0
        )
        assert "holds a finished run (4 steps); nothing to do" in capsys.readouterr().err
        assert tree_digest(finished) == before
        assert json.loads((finished / "summary.json").read_text())["history"]


def test_resume_auto_with_more_steps_extends_a_finished_run(finished, model_dirs, train_file):
    """A finished run is finished for its own max_steps: asking for more continues from its last checkpoint."""
    assert (
        run_command(train_main, cli_args(model_dirs, train_file, finished, "--max_steps", "6", "--resume", "auto")) == 0
    )
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["steps"] == 6
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4, 5, 6]  # every step, not only the extension's
    assert metric_steps(finished) == [1, 2, 3, 4, 5, 6]  # a restart from scratch would log steps 1-4 twice


def test_an_unfinished_run_of_an_earlier_version_still_resumes(model_dirs, train_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_command(train_main, cli_args(model_dirs, train_file, out, "--max_steps", "2")) == 0
    for name in ("summary.json", ownership.MARKER):  # an earlier version's run, stopped after its second checkpoint
        (out / name).unlink()
    assert run_command(train_main, cli_args(model_dirs, train_file, out, "--max_steps", "3", "--resume", "auto")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert json.loads((out / ownership.MARKER).read_text())["command"] == OUTPUT.command


@pytest.mark.parametrize("extra", [(), ("--overwrite_output_dir", "true"), ("--resume", "auto")])
def test_foreign_and_other_commands_directories_are_refused_untouched(model_dirs, train_file, tmp_path, capsys, extra):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cot = tmp_path / "cot"  # a data-gen cot output of an earlier version (no marker)
    cot.mkdir()
    (cot / "config.yaml").write_text("input_file: q.jsonl\nquestion_field: question\n")
    (cot / "journal.jsonl").write_text('{"id": "q0"}\n')
    # An unmarked output of another command (a version before markers) is not told from a user's folder: only its
    # own command recognises it (kd_core.ownership knows no command).
    for directory, held in ((foreign, "files not written by this command"), (cot, "files not written by this command")):
        before = tree_digest(directory)
        assert run_command(train_main, cli_args(model_dirs, train_file, directory, "--max_steps", "2", *extra)) == 2
        err = capsys.readouterr().err
        assert "is not a distill train output directory" in err and held in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("error:")
        assert tree_digest(directory) == before


def test_resume_with_other_settings_is_refused_untouched(finished, model_dirs, train_file, capsys):
    before = tree_digest(finished)
    args = cli_args(model_dirs, train_file, finished, "--max_steps", "4", "--resume", "auto")
    args[args.index("--loss.terms") + 1] = "{ce: 1.0}"
    assert run_command(train_main, args) == 2
    assert "holds a run with other settings (loss.terms)" in capsys.readouterr().err
    assert tree_digest(finished) == before


def test_resume_path_of_a_run_with_another_tokenizer_is_refused(model_dirs, train_file, tmp_path, capsys):
    """Issue 31: `--resume PATH` used to accept another run's checkpoint and export its weights under this run's
    tokenizer. Here the student's architecture (and vocabulary size) and the settings are the same, only the
    tokenizer differs (no teacher: the teacher's would be refused for its own mismatch first)."""
    import shutil

    from distill.student.tiny import train_tokenizer

    other = tmp_path / "other_student"
    shutil.copytree(model_dirs["student"], other)
    corpus = [f"token {i} zebra quartz {i * 7} xylophone" for i in range(200)]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / name).unlink(missing_ok=True)
    train_tokenizer(corpus, vocab_size=300).save_pretrained(other)

    def args(student, out, *extra):
        return [
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "4",
            "--save_steps",
            "1",
            "--eval_steps",
            "null",
            "--report_to",
            "[none]",
            "--model.student",
            str(student),
            "--data.train_file",
            str(train_file),
            "--data.eval_fraction",
            "0",
            "--loss.terms",
            "{ce: 1.0}",
            "--max_steps",
            "2",
            *extra,
        ]

    assert run_command(train_main, args(other, tmp_path / "theirs")) == 0
    capsys.readouterr()
    mine = tmp_path / "mine_student"  # this run's student: the same weights and config, the fixture's tokenizer
    shutil.copytree(model_dirs["student"], mine)
    args_now = args(mine, tmp_path / "mine", "--resume", str(tmp_path / "theirs" / "checkpoint-2"), "--max_steps", "4")
    before = tree_digest(tmp_path)
    assert run_command(train_main, args_now) == 2
    err = capsys.readouterr().err
    assert "was trained with another tokenizer" in err, err[-2000:]
    assert tree_digest(tmp_path) == before
