"""One writer per output directory, with two real processes (issue 31): the first run is held at a write point
(tests/kill_points) while it holds its directory's lock, a second run into the same directory is refused in one line
naming the first's pid and command, exit 2, nothing changed; once the first is killed with SIGKILL the kernel has
dropped its lock and the directory resumes (or is written) normally."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_gen.testing import ScriptedServer
from tests.conftest import REPO_ROOT, addition_rows, tree_digest, write_jsonl

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
}


@contextlib.contextmanager
def held_at(command: list[str], point: str, timeout: float = 300):
    """Runs ``command`` until it reaches the write point ``point`` (it then sleeps there, holding what it holds);
    yields the process, and kills it with SIGKILL when the block ends."""
    flag = Path(tempfile.mkdtemp()) / "reached"
    paths = [str(REPO_ROOT / "tests" / "kill_points"), ENV["PYTHONPATH"]]
    env = {**ENV, "KILL_POINT": point, "KILL_POINT_FLAG": str(flag), "PYTHONPATH": os.pathsep.join(paths)}
    log = flag.parent / "stderr.txt"
    with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would stall the run before its write point
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + timeout
        while not flag.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.exists(), f"never reached {point}: {log.read_text()[-3000:]}"
        yield process
    finally:
        process.kill()
        process.wait()
        flag.unlink(missing_ok=True)
        log.unlink()
        flag.parent.rmdir()


def assert_refused(command: list[str], watched: Path, first: subprocess.Popen, name: str) -> None:
    """``command`` ends in one line naming the running ``first`` and its command ``name``, exit 2, and leaves
    ``watched`` byte-identical."""
    before = tree_digest(watched)
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"is being written by pid {first.pid} on " in errors[0] and f", {name}, since " in errors[0], errors[0]
    assert tree_digest(watched) == before


def train_command(model_dirs, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "distill",
        "train",
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--eval_steps",
        "null",
        "--report_to",
        "[none]",
        "--model.teacher",
        str(model_dirs["teacher"]),
        "--model.student",
        str(model_dirs["student"]),
        "--data.train_file",
        str(data),
        "--data.eval_fraction",
        "0",
        "--loss.terms",
        "{forward_kl: 0.7, ce: 0.3}",
        *extra,
    ]


def test_train_second_writer_refused_with_resume_auto_and_overwrite_then_resumes_once_killed(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(16))
    out = tmp_path / "run"
    with held_at(train_command(model_dirs, data, out), "publish:checkpoint-1") as first:
        for extra in (("--resume", "auto"), ("--overwrite_output_dir", "true")):
            assert_refused(train_command(model_dirs, data, out, *extra), tmp_path, first, "distill train")
    resumed = subprocess.run(
        train_command(model_dirs, data, out, "--resume", "auto"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and [h["step"] for h in summary["history"]] == [1, 2, 3]
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    assert not (out / ".kd_lock").exists()


def test_cot_second_writer_refused_and_pays_for_nothing(tmp_path):
    from tests.data_gen import test_cot

    server = ScriptedServer(test_cot.responder).start()
    try:
        questions = test_cot.write_questions(tmp_path / "q.jsonl", test_cot.GOLDS)
        out = tmp_path / "cot"
        command = [sys.executable, "-m", "data_gen", *test_cot.args(server, questions, out)]
        with held_at(command, "reserve:config.yaml") as first:
            calls = server.total
            assert_refused(command, tmp_path, first, "data-gen cot")
            assert server.total == calls  # the refused run paid for no call
        again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(test_cot.rows(out)) == 3 and not (out / ".kd_lock").exists()
    finally:
        server.stop()


def test_precompute_second_writer_refused_then_restarts_once_killed(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(12))
    out = tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "distill",
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
        "0",
    ]
    with held_at(command, "reserve:store.json") as first:
        assert_refused(command, tmp_path, first, "distill precompute")
    again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "interrupted precompute" in again.stderr and (out / "store.json").is_file()
    assert not (out / ".kd_lock").exists()


def test_prune_second_writer_refused_then_writes_once_killed(model_dirs, tmp_path):
    out = tmp_path / "pruned"
    command = [
        sys.executable,
        "-m",
        "distill",
        "prune",
        "--model",
        str(model_dirs["teacher"]),
        "--output-dir",
        str(out),
        "--depth.num_layers",
        "2",
        "--depth.method",
        "uniform",
    ]
    with held_at(command, f"publish:{out.name}") as first:
        assert_refused(command, tmp_path, first, "distill prune")
    again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "prune_report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock, no temporary
