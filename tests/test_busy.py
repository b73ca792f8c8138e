"""bench/busy.py, the loaded-machine runner of issue 32: it passes the command's exit status through and never
leaves a busy process behind, whether the command ends, runs past ``--max-s`` or the runner is stopped."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil

from tests.conftest import REPO_ROOT

BUSY = [sys.executable, str(REPO_ROOT / "bench" / "busy.py"), "--per-core", "1"]


def busy_pids(stderr: str) -> list[int]:
    match = re.search(r"busy processes on \d+ cores \(pids ([\d ]+)\)", stderr)
    assert match, stderr
    return [int(pid) for pid in match.group(1).split()]


def assert_gone(pids: list[int]) -> None:
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"busy processes left running: {alive}"


def test_the_command_runs_loaded_and_its_exit_status_comes_back():
    code = "import os, sys; print(os.cpu_count()); sys.exit(3)"
    proc = subprocess.run([*BUSY, "--", sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout.strip().isdigit(), proc.stderr
    pids = busy_pids(proc.stderr)
    assert len(pids) == psutil.cpu_count() and "busy.py: exit 3 after" in proc.stderr
    assert_gone(pids)


def test_max_s_stops_the_command_as_ctrl_c_does_and_the_load():
    code = "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('summary printed')"
    proc = subprocess.run(
        [*BUSY, "--max-s", "2", "--", sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 124 and "ran past --max-s 2" in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "summary printed"  # what pytest does on Ctrl-C: report what ran
    assert_gone(busy_pids(proc.stderr))


def test_sigterm_stops_the_command_and_the_load(tmp_path):
    marker = tmp_path / "started"
    code = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"
    runner = subprocess.Popen([*BUSY, "--", sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():  # an event, not a guessed delay: the command has started
        assert runner.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    runner.send_signal(signal.SIGTERM)
    _, stderr = runner.communicate(timeout=60)
    assert runner.returncode == 143, stderr
    assert_gone(busy_pids(stderr))
    command = [p for p in psutil.process_iter(["cmdline"]) if str(marker) in " ".join(p.info["cmdline"] or [])]
    assert not command, "the command outlived the runner"


def test_no_command_is_a_one_line_usage_error():
    proc = subprocess.run([*BUSY], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "command: expected a command after --" in proc.stderr
