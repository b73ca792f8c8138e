"""Run a command on a deliberately loaded machine: extra busy processes per core for as long as the command runs.

    python bench/busy.py -- python -m pytest -q                  # two busy processes per core (the default)
    python bench/busy.py --per-core 1 --max-s 600 -- CMD ARGS...  # one per core, the command stopped after 10 min

A test that passes idle and fails here depends on the machine's speed (issue 32). The busy processes spin in pure
Python at normal priority, so the command competes with them as with other jobs on a shared CI runner. They are
stopped when the command ends, on Ctrl-C or SIGTERM, and they stop themselves when this script dies (they watch
their parent) or ``--max-s`` passes, so none is ever left behind. The command itself is stopped as by Ctrl-C first
(pytest then prints its summary of what ran), SIGTERM and SIGKILL only if it lingers. Exits with the command's exit
status (124 when ``--max-s`` stopped it, 130 on Ctrl-C, 143 on SIGTERM); prints the busy processes' count and the
command's wall time to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

# A busy loop that exits on its own once its parent is gone or its deadline passes (checked every ~50 ms of work).
# Ctrl-C is ignored: the parent stops them (and a traceback from each would bury the command's last lines).
SPIN = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent, deadline = int(sys.argv[1]), float(sys.argv[2])
while os.getppid() == parent and time.time() < deadline:
    for _ in range(200_000):
        pass
"""


def start_busy(count: int, deadline: float) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid()), str(deadline)], stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]


def stop(processes: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM each one still running, then SIGKILL what is left after ``grace_s``."""
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    end = time.monotonic() + grace_s
    for proc in processes:
        try:
            proc.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Terminated(Exception):
    """This script received SIGTERM."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def interrupt(command: subprocess.Popen, *, signalled: bool = False, grace_s: float = 120.0) -> None:
    """Ctrl-C to the command (unless it had it already), then SIGTERM and SIGKILL if it is still running."""
    if not signalled and command.poll() is None:
        command.send_signal(signal.SIGINT)
    try:
        command.wait(grace_s)
    except subprocess.TimeoutExpired:
        stop([command], grace_s=30.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-core", type=int, default=2, help="busy processes per CPU core")
    parser.add_argument("--max-s", type=float, default=3600.0, help="stop the command (and the load) after this long")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("command: expected a command after --")
    if args.per_core < 0 or args.max_s <= 0:
        parser.error("--per-core: expected >= 0; --max-s: expected > 0")
    signal.signal(signal.SIGTERM, _raise_terminated)
    cores = os.cpu_count() or 1
    busy = start_busy(args.per_core * cores, time.time() + args.max_s + 30)
    print(
        f"busy.py: {len(busy)} busy processes on {cores} cores (pids {' '.join(str(p.pid) for p in busy)})",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    child = None
    try:
        child = subprocess.Popen(command)
        try:
            code = child.wait(args.max_s)
        except subprocess.TimeoutExpired:
            print(f"busy.py: the command ran past --max-s {args.max_s:.0f}; stopping it", file=sys.stderr, flush=True)
            interrupt(child)
            code = 124
    except KeyboardInterrupt:  # Ctrl-C in a terminal reached the command too (same process group)
        if child is not None:
            interrupt(child, signalled=True)
        code = 130
    except _Terminated:
        if child is not None:
            interrupt(child)
        code = 143
    finally:
        stop(busy)
    code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    print(
        f"busy.py: exit {code} after {time.monotonic() - started:.0f} s under {len(busy)} busy processes",
        file=sys.stderr,
        flush=True,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
