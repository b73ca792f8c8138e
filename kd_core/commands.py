"""Running commands: exit codes, the one-line error guard, and dispatch from a subcommand table.

Every command module has the same shape:

* ``Config``: its typed config class (a dataclass; ``Config = DescriptiveNameConfig``);
* ``run(cfg: Config) -> result``: does the work, prints its progress and closing lines, and returns its result (a
  dict or dataclass of figures and paths). It is synchronous (asynchronous internals stay inside) and is what other
  code calls: the quickstart and the Lion loop drive every stage through ``run`` with config objects. A user mistake
  raises :class:`kd_core.config.ConfigError`. A run that stops early on purpose (budget cap, SIGINT/SIGTERM, training
  preemption) is not an error: everything done is saved, ``run`` returns, and its result's ``stopped`` names the
  reason (None when the run finished);
* ``main(argv: list[str]) -> int``: parses the command line into a ``Config``, calls ``run`` and maps its result to
  an exit code (:func:`stop_code` for a command that can stop early, else ``EXIT_OK``); nothing else.

An orchestration (quickstart, Lion) raises :class:`Stopped` from a stage whose ``run`` stopped early and catches it in
its own ``run``, so its result's ``stopped`` carries the stage's reason and the exit code is the stage's.

A subcommand table maps names to command modules; modules are imported lazily, so ``--help`` stays fast and a
missing optional dependency of one command does not break the others.
"""

from __future__ import annotations

import difflib
import errno
import gc
import importlib
import os
import signal
import sys
import threading
import typing

from kd_core.config import ConfigError

EXIT_OK = 0
EXIT_USAGE = 2  # a user mistake, reported in one line; nothing on disk was touched
EXIT_STOPPED = 3  # a data-gen run stopped cleanly (budget cap, SIGTERM): rerun the same command to resume
EXIT_PREEMPTED = 75  # training saved a checkpoint on SIGTERM/SIGUSR1 (EX_TEMPFAIL): requeue and --resume auto
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it): stopped at once, nothing half-written kept

# Why a Ctrl-C leaves nothing to distrust: files and directories are published by atomic rename (kd_core/atomic.py),
# whose unfinished temporaries are removed as the interrupt unwinds, and a store or run whose ownership marker still
# says "running" is redone or resumed, never read as finished.
INTERRUPTED_LINE = (
    "interrupted (Ctrl-C): stopped; every finished output is whole and nothing half-written was kept "
    "(rerun the same command to continue or start again)"
)

PREEMPTED = "preempted"  # the ``stopped`` reason of a training run that saved a checkpoint on SIGTERM/SIGUSR1
INTERRUPTED = "interrupted"  # the ``stopped`` reason of a data-gen run stopped cleanly by Ctrl-C


def stop_code(stopped: str | None) -> int:
    """The exit code of a run whose result says it ``stopped`` early for this reason (None: it finished)."""
    if stopped is None:
        return EXIT_OK
    if stopped == INTERRUPTED:  # Ctrl-C, after in-flight calls were saved: 130, as for every other command
        return EXIT_INTERRUPTED
    return EXIT_PREEMPTED if stopped == PREEMPTED else EXIT_STOPPED


class Stopped(Exception):
    """A stage of an orchestration stopped early with ``reason`` (a stage result's ``stopped``); the message, if any,
    is printed by the orchestration's ``run``."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def run_command(main: typing.Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Runs a command's ``main``; user errors print one line to stderr and exit with code 2, Ctrl-C one line and
    exit 130 (the context managers that clean up half-written files have run by the time it reaches here)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        pass  # reported below, once the interrupted frames are freed (their progress bars print on close)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        line = filesystem_error_line(err)
        if line is None:
            raise  # not the filesystem refusing a path: a bug, shown with its traceback
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting must not print a traceback
    gc.collect()  # closes what the interrupted frames held in reference cycles (a bar's last refresh) before the line
    print(f"\n{INTERRUPTED_LINE}", file=sys.stderr)
    return EXIT_INTERRUPTED


# Errors of the filesystem about a path the user gave or a disk they filled; anything else is a bug.
_FILESYSTEM_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EFBIG,
        errno.EMFILE,
    }
)


def filesystem_error_line(err: OSError) -> str | None:
    """``<path>: <strerror>`` for a filesystem OSError (permission denied, not found, no space left, read-only,
    ...), None for any other OSError (a socket, a subprocess, a library's own misuse), which stays a traceback."""
    if err.errno not in _FILESYSTEM_ERRNOS:
        return None
    reason = err.strerror or str(err)
    if err.filename is None:
        return reason if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else None
    path = os.fsdecode(err.filename) if isinstance(err.filename, bytes) else str(err.filename)
    if err.filename2 is not None:
        path = f"{path} -> {err.filename2}"
    return f"{path}: {reason}"


def print_help(prog: str, commands: dict[str, tuple[str, str]]) -> None:
    print(f"usage: {prog} <command> [--config FILE] [--field value ...]\n\ncommands:")
    width = max(len(name) for name in commands)
    for name, (_, summary) in commands.items():
        print(f"  {name:<{width}}  {summary}")
    print(f"\nRun '{prog} <command> --help' for the fields of a command.")


def command_module(commands: dict[str, tuple[str, str]], name: str):
    """The module of subcommand ``name`` (it has ``Config``, ``run`` and ``main``)."""
    return importlib.import_module(commands[name][0])


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None) -> int:
    """``prog <name> ARGS``: runs the ``main`` of the module that ``commands[name]`` names."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help(prog, commands)
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    if name not in commands:
        close = difflib.get_close_matches(name, list(commands), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'{hint} (see '{prog} --help')", file=sys.stderr)
        return EXIT_USAGE
    # The module is imported inside run_command: importing torch takes seconds, and a Ctrl-C then is one line too.
    return run_command(lambda args: command_module(commands, name).main(args), rest)
