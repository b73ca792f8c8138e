"""``data-gen lion`` on a tiny local student and a scripted teacher/referee on loopback: two iterations complete, pools
grow, unparseable referee answers are counted and skipped; the loop resumes after ``kill -9`` in each stage."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from data_gen.engine import ParseError
from data_gen.testing import ScriptedServer
from kd_recipes.lion import LionConfig, parse_scores
from tests.conftest import REPO_ROOT

POOL = [
    "Add 3 and 4.",
    "Name a colour of the sky.",
    "Translate good morning into French.",
    "Write a short poem about the sea.",
]


def responder(body: dict) -> str:
    content = body["messages"][-1]["content"]
    if content.startswith("You are a fair judge"):
        instruction = re.search(r"Instruction: (.*)\n", content).group(1)
        first_is_teacher = "[Assistant 1]\nTEACHER" in content
        if "colour" in instruction:
            return "I cannot decide."  # never parseable: retried, then counted and skipped
        student = 9 if "poem" in instruction else 2  # the student ties with the teacher only on poems (easy)
        t, s = 9, student
        return f"Assistant 1: {t if first_is_teacher else s}\nAssistant 2: {s if first_is_teacher else t}"
    if content.startswith("Here are instructions"):
        tag = hashlib.sha256(content.encode()).hexdigest()
        words = [tag[i : i + 5] for i in range(0, 40, 5)]
        return "\n".join(f"Task {k}: Explain {words[k]} and {words[k + 2]} in detail." for k in range(1, 5))
    return "TEACHER: a careful answer to " + content


def config(server: ScriptedServer, model_dirs, tmp_path: Path, out: Path) -> Path:
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in POOL))
    tree = {
        "train_pool": str(pool),
        "student": str(model_dirs["student"]),
        "output_dir": str(out),
        "iterations": 2,
        "new_hard": 2,
        "new_easy": 1,
        "student_max_new_tokens": 8,
        "training": {"max_steps": 2, "batch_size": 2, "max_length": 64},
        "teacher": {
            "model": "scripted",
            "base_url": server.base_url,
            "api_key_env": None,
            "max_parse_retries": 1,
            "backoff_base_s": 0.01,
        },
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text("# data-gen lion\n" + yaml.safe_dump(tree))
    return path


@pytest.fixture
def server():
    srv = ScriptedServer(responder).start()
    yield srv
    srv.stop()


def run_cli(cfg: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "data_gen", "lion", "--config", str(cfg)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def test_two_iterations_then_resume_after_kill_in_each_stage(server, model_dirs, tmp_path):
    from kd_recipes.cli import data_gen_main as main

    out = tmp_path / "ref"
    assert main(["lion", "--config", str(config(server, model_dirs, tmp_path, out))]) == 0
    summary = json.loads((out / "lion_summary.json").read_text())["iterations"]
    first, second = summary
    # Colour: referee never parseable -> skipped; poem: a tie (easy, half a win); the other two: hard.
    assert (first["hard"], first["easy"], first["skipped"]) == (2, 1, 1)
    assert first["win_rate"] == pytest.approx(0.5 / 3)
    assert first["train_pool"] == 4 and first["new_hard"] == 2 and first["new_easy"] == 1
    assert second["train_pool"] == second["cache_pool"] == 7
    assert (out / "iter_002" / "imitation" / "train" / "final" / "config.json").is_file()
    judged = json.loads((out / "iter_001" / "discrimination" / "done.json").read_text())["items"]
    assert {it["instruction"]: it.get("skipped") for it in judged}[
        "Name a colour of the sky."
    ] == "parse:referee_unparsed"
    hard = {it["instruction"]: (it["teacher_score"], it["student_score"]) for it in judged if it.get("hard")}
    assert hard == {"Add 3 and 4.": (9, 2), "Translate good morning into French.": (9, 2)}

    # The same run killed (-9) once inside each stage of iteration 1, then finished: the same figures.
    killed = tmp_path / "killed"
    cfg = config(server, model_dirs, tmp_path, killed)
    # Each teacher call takes 0.2 s while the kills land, so a stage cannot finish between its folder appearing and
    # the kill however fast the machine is (CI once raced a similar test).
    server.latency_s = 0.2
    for stage in ("imitation", "discrimination", "generation"):
        proc = run_cli(cfg)
        marker = killed / "iter_001" / stage
        deadline = time.time() + 300  # a guard against a hung run, far above a busy machine's pace
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (marker / "done.json").exists() or stage == "imitation"
    server.latency_s = 0.0
    proc = run_cli(cfg)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-2000:]
    assert "win rate" in output
    again = json.loads((killed / "lion_summary.json").read_text())["iterations"]
    keys = ("train_pool", "cache_pool", "hard", "easy", "skipped", "win_rate", "new_hard", "new_easy")
    assert [{k: r[k] for k in keys} for r in again] == [{k: r[k] for k in keys} for r in summary]


def test_referee_parsing():
    assert parse_scores("Assistant 1: 7\nAssistant 2: 8.5", "stop") == (7.0, 8.5)
    assert parse_scores("assistant 2 = 3, Assistant 1: 10", "stop") == (10.0, 3.0)
    for bad in ("Both fine.", "Assistant 1: 7", "Assistant 1: 0\nAssistant 2: 11"):
        with pytest.raises(ParseError):
            parse_scores(bad, "stop")


def test_bad_pool_exits_2(server, model_dirs, tmp_path, capsys):
    from kd_recipes.cli import data_gen_main as main

    cfg = config(server, model_dirs, tmp_path, tmp_path / "bad")
    (tmp_path / "pool.jsonl").write_text('{"instruction": "ok"}\n{"text": "no instruction"}\n')
    assert main(["lion", "--config", str(cfg)]) == 2
    assert "pool.jsonl:2: field 'instruction'" in capsys.readouterr().err
    assert LionConfig.__name__ == "LionConfig"


def test_a_directory_that_is_not_a_lion_run_is_refused_untouched(server, model_dirs, train_file, tmp_path, capsys):
    """Issue 15, case 3: `data-gen lion` pointed at a finished training run used to overwrite its config.yaml before
    failing; now nothing in it changes."""
    from distill.training.train import main as train_main
    from kd_core.commands import run_command
    from kd_recipes.cli import data_gen_main as main
    from tests.conftest import tree_digest

    run = tmp_path / "run"
    assert (
        run_command(
            train_main,
            [
                "--output_dir",
                str(run),
                "--max_steps",
                "1",
                "--per_device_train_batch_size",
                "4",
                "--eval_steps",
                "null",
                "--report_to",
                "[none]",
                "--model.student",
                str(model_dirs["student"]),
                "--data.train_file",
                str(train_file),
                "--data.eval_fraction",
                "0",
                "--loss.terms",
                "{ce: 1.0}",
            ],
        )
        == 0
    )
    capsys.readouterr()
    before = tree_digest(run)
    assert main(["lion", "--config", str(config(server, model_dirs, tmp_path, run))]) == 2
    err = capsys.readouterr().err
    assert "is not a data-gen lion output directory (it holds a finished distill train output)" in err, err
    assert tree_digest(run) == before


def test_shipped_config_parses():
    from kd_core.config import parse_command_line

    cfg = parse_command_line(LionConfig, ["--config", str(REPO_ROOT / "configs/data_gen/lion.yaml")], "data-gen lion")
    assert cfg.iterations == 2 and cfg.teacher.backend == "api"


def test_budget_stop_exits_3_and_a_rerun_with_more_budget_finishes(server, model_dirs, tmp_path):
    """The budget cap stops the loop cleanly (exit 3, everything paid for kept); raising it lets the rerun finish."""
    from kd_recipes.cli import data_gen_main as main

    out = tmp_path / "budget"
    cfg = config(server, model_dirs, tmp_path, out)
    tree = yaml.safe_load(cfg.read_text())
    tree["iterations"] = 1
    tree["teacher"].update({"price_input_per_m": 1000.0, "price_output_per_m": 1000.0, "max_cost_usd": 0.05})
    cfg.write_text("# data-gen lion\n" + yaml.safe_dump(tree))
    assert main(["lion", "--config", str(cfg)]) == 3
    assert not (out / "lion_summary.json").exists()
    calls_after_stop = server.total
    tree["teacher"]["max_cost_usd"] = 1000.0
    cfg.write_text("# data-gen lion\n" + yaml.safe_dump(tree))
    assert main(["lion", "--config", str(cfg)]) == 0
    assert json.loads((out / "lion_summary.json").read_text())["iterations"]
    assert server.total > calls_after_stop
