"""``python -m distill.training.launch ARGS``: ``accelerate launch ARGS`` whose exit status says a preemption.

Same arguments and behaviour as ``accelerate launch`` (accelerate 1.15.0's ``launch_command``, run in this process),
except for the exit status once the ranks have stopped:

* **75** (kd_core.commands.EXIT_PREEMPTED) when every rank of this machine ended with 75, i.e. saved a checkpoint
  on SIGTERM/SIGUSR1: rerun with ``--resume auto``. That holds whether the launcher itself was signalled (as Slurm
  does) or the ranks were;
* **3** (kd_core.commands.EXIT_STOPPED) when every rank ended with 3: the served teacher was lost and every rank
  stopped together after saving the position of the failed step (distill.training.loop.Distiller.guarded_step);
* 128 + the signal number when the launcher was signalled and the ranks did not all save (killed after the
  shutdown timeout, crashed, or not started yet), the shell's convention;
* 1 when a rank failed, 0 when all succeeded, a single process's own exit code under the simple launcher.

Under the simple (single-process) launcher, accelerate 1.15's ``simple_launcher`` only ``Popen``s the training
process and waits: a SIGTERM/SIGUSR1 to the launcher would end the launcher and never reach the trainer. Here the
launcher forwards both to its child processes, so the trainer saves and exits 75 and so does the launcher (the
multi-process launchers install torch elastic's own handlers, which replace these and forward the signal themselves).

Why a wrapper: ``accelerate launch`` exits 1 after any signal, and no setting changes it. Read in torch 2.13.0:
``torch/distributed/elastic/multiprocessing/api.py`` ``PContext.start`` installs ``_terminate_process_handler``
for TORCHELASTIC_SIGNALS_TO_HANDLE (torchrun's ``--signals-to-handle`` / PET_SIGNALS_TO_HANDLE), which raises
``SignalException``; ``torch/distributed/elastic/agent/server/api.py`` ``SimpleElasticAgent.run`` catches it,
calls ``_shutdown(e.sigval, timeout=shutdown_timeout)`` (``SubprocessContext._close``: forwards the signal to
each rank, waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT, then SIGKILLs what is left, discarding the exit codes it
reaped) and re-raises; ``torch/distributed/launcher/api.py`` ``launch_agent`` re-raises it too. accelerate's
``multi_gpu_launcher`` / ``deepspeed_launcher`` (``accelerate/commands/launch.py``) re-raise every exception from
``torch.distributed.run.run``, so the ``accelerate`` command dies of an uncaught ``SignalException`` (exit 1,
"got signal: 15"). When the ranks exit 75 on their own, the agent reports a failed group (``ChildFailedError``),
again exit 1. The ranks' codes are lost in both cases, so each rank reports its own here
(distill.training.runtime.report_exit_code, in a directory this process names in DISTILL_LAUNCH_STATUS_DIR).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from distill.training.runtime import LAUNCH_STATUS_ENV
from kd_core.commands import EXIT_PREEMPTED, EXIT_STOPPED


def ranks_exit_code(status_dir: Path) -> int | None:
    """The exit code every local rank reported, or None when some rank reported none or they differ."""
    codes, expected = set(), None
    reports = sorted(status_dir.glob("rank-*[0-9]"))
    for report in reports:
        try:
            code, world = report.read_text().split()
            codes.add(int(code))
            expected = int(world)
        except (OSError, ValueError):
            return None
    if len(codes) != 1 or expected != len(reports):
        return None
    return codes.pop()


def forward_to_children(signum: int, _frame) -> None:
    """Sends ``signum`` on to this process's children (psutil, a dependency of accelerate)."""
    import psutil

    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    status_dir = Path(tempfile.mkdtemp(prefix="distill-launch-"))
    os.environ[LAUNCH_STATUS_ENV] = str(status_dir)
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the simple launcher's child; see the module docstring
        signal.signal(sig, forward_to_children)
    try:
        try:
            launch_command(args)
            return 0
        except SignalException as stop:
            # The agent has already forwarded the signal and waited for the ranks; ignore further ones from here on.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_IGN)
            if ranks_exit_code(status_dir) == EXIT_PREEMPTED:
                print(f"distill launch: {stop}; every rank saved a checkpoint: exit {EXIT_PREEMPTED}", file=sys.stderr)
                return EXIT_PREEMPTED
            print(f"distill launch: {stop}; the ranks did not all save a checkpoint", file=sys.stderr)
            return 128 + int(stop.sigval)
        except ChildFailedError as failed:
            codes = {failure.exitcode for failure in failed.failures.values()}
            for saved in (EXIT_PREEMPTED, EXIT_STOPPED):  # a stop signal; a served teacher lost (all ranks at once)
                if codes == {saved} and ranks_exit_code(status_dir) == saved:
                    print(f"distill launch: every rank saved a checkpoint: exit {saved}", file=sys.stderr)
                    return saved
            print(f"distill launch: {failed}", file=sys.stderr)
            return 1
        except subprocess.CalledProcessError as failed:  # the simple (single-process) launcher
            if failed.returncode == EXIT_PREEMPTED:
                print(f"distill launch: the process saved a checkpoint: exit {EXIT_PREEMPTED}", file=sys.stderr)
            return failed.returncode if failed.returncode > 0 else 128 - failed.returncode
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
