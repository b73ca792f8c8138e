"""Output ownership: which command wrote a directory, whether it may resume there, and what ``--overwrite`` removes.

Every command that writes a directory (``distill train``, ``prune``, ``precompute``, ``export``, ``quickstart``,
``data-gen self-instruct``, ``cot``, ``lion``) records itself in a small marker file, :data:`MARKER`
(``.kd_owner.json``, written with :mod:`kd_core.atomic`)::

    {"command": "distill train", "settings": {"loss.terms": {...}, ...}, "state": "running", "version": 1}

``settings`` are the values that must equal the new run's for it to resume there; ``state`` becomes ``"finished"``
once the command's final output is written. The rules, the same for every command:

* an absent or empty directory is a new run;
* a directory owned by the same command resumes (when the settings match; each command words its refusal);
* a directory owned by another command, or by none (a user's folder), is refused in one line (ConfigError: exit 2,
  nothing touched), whatever ``--overwrite`` says;
* ``--overwrite`` removes only the entries of :attr:`Kind.entries` (what that command writes) and the marker:
  anything else in the directory stays.

Directories written before markers existed are recognised by what they hold (:func:`infer`, the only place that
knows each command's files): a training run has ``checkpoint-N/``, ``latest`` or ``summary.json``; a cot output a
``config.yaml`` with ``input_file`` and ``question_field``; and so on. Such a directory resumes as it always did;
its settings are unknown (None), so only the command's own checks (checkpoint, ``config.yaml``) compare them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd_core.atomic import atomic_write_json
from kd_core.config import ConfigError

MARKER = ".kd_owner.json"
VERSION = 1

TRAIN = "distill train"
PRUNE = "distill prune"
PRECOMPUTE = "distill precompute"
EXPORT = "distill export"
QUICKSTART = "distill quickstart"
SELF_INSTRUCT = "data-gen self-instruct"
COT = "data-gen cot"
LION = "data-gen lion"


def _config_keys(directory: Path) -> set[str]:
    """Top-level keys of ``directory/config.yaml`` (empty when absent or unreadable)."""
    path = directory / "config.yaml"
    if not path.is_file():
        return set()
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return set()
    return set(loaded) if isinstance(loaded, dict) else set()


def _has_checkpoint(directory: Path) -> bool:
    return any(re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir() for p in directory.glob("checkpoint-*"))


@dataclass(frozen=True)
class Kind:
    """A command that owns directories: the top-level entries it writes (globs) and how an unmarked directory of an
    earlier version is recognised."""

    command: str
    entries: tuple[str, ...]
    detect: Callable[[Path], bool]
    done: str | None = None  # the file whose presence means the run finished (for unmarked directories)


# Most specific first: a quickstart or Lion directory also holds a config.yaml, a training run a metrics.jsonl.
KINDS: dict[str, Kind] = {kind.command: kind for kind in (
    Kind(QUICKSTART, ("config.yaml", "timings.json", "data", "teacher_init", "teacher", "cot", "student_init",
                      "prune_cache", "students", "eval", "plots", "report.md", "report.json", ".*.tmp"),
         lambda d: (d / "report.json").is_file()
         or {"teacher_steps", "cot_samples", "student_steps"} <= _config_keys(d),
         done="report.json"),
    Kind(LION, ("config.yaml", "pools_initial.json", "iter_*", "lion_summary.json", "cache.sqlite*", ".*.tmp"),
         lambda d: (d / "pools_initial.json").is_file() or (d / "lion_summary.json").is_file()
         or {"train_pool", "iterations"} <= _config_keys(d),
         done="lion_summary.json"),
    Kind(TRAIN, ("config.yaml", "metrics.jsonl", "checkpoint-*", ".checkpoint-*.tmp", "latest", "summary.json",
                 "final", "distill", ".*.tmp"),
         lambda d: _has_checkpoint(d) or (d / "latest").is_file() or (d / "summary.json").is_file()
         and {"model", "loss"} <= _config_keys(d),
         done="summary.json"),
    Kind(COT, ("config.yaml", "journal.jsonl", "cache.sqlite*", "data.jsonl", "data.parquet", "README.md",
               "stats.json", ".*.tmp"),
         lambda d: {"input_file", "question_field"} <= _config_keys(d), done="stats.json"),
    Kind(SELF_INSTRUCT, ("config.yaml", "journal.jsonl", "cache.sqlite*", "data.jsonl", "data.parquet", "README.md",
                         ".*.tmp"),
         lambda d: {"seed_tasks", "target"} <= _config_keys(d)),
    Kind(PRUNE, ("*",), lambda d: (d / "prune_report.json").is_file(), done="prune_report.json"),
    Kind(PRECOMPUTE, ("*",), lambda d: (d / "store.json").is_file() and (d / "precompute_config.yaml").is_file(),
         done="store.json"),
    Kind(EXPORT, ("*",), lambda d: False),
)}


@dataclass
class Owner:
    """Who wrote a non-empty directory."""

    command: str | None  # None: no command of this project (a user's folder, or something unrecognised)
    settings: dict[str, Any] | None  # None: unknown (an unmarked directory of an earlier version)
    finished: bool
    inferred: bool  # True: recognised by its content (no marker)

    def describe(self) -> str:
        if self.command is None:
            return "files not written by any kd command"
        state = "a finished" if self.finished else "an unfinished"
        return f"{state} {self.command} output"


def infer(directory: str | Path) -> str | None:
    """The command that wrote an unmarked ``directory`` of an earlier version, judged by its content; None if none."""
    directory = Path(directory)
    for kind in KINDS.values():
        if kind.detect(directory):
            return kind.command
    return None


def owner_of(directory: str | Path) -> Owner | None:
    """The owner of ``directory``; None when it is absent or empty. A path that is a file is a ConfigError."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory")
    if not directory.is_dir() or not any(directory.iterdir()):
        return None
    marker = directory / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
            return Owner(data["command"], data.get("settings"), data.get("state") == "finished", False)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged marker: judge by the content, as for an earlier version
    command = infer(directory)
    done = KINDS[command].done if command else None
    return Owner(command, None, bool(done and (directory / done).exists()), True)


def check_writable(directory: str | Path, field: str) -> None:
    """``directory`` is a directory (or absent) that this process can write, or can create in its nearest existing
    parent; otherwise one ConfigError naming ``field``. Reads only."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{field}: {directory} is a file; expected a directory (or a path to create one at)")
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{field}: {directory} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == directory else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"{field}: {directory} {what} (permission denied)")


def check(directory: str | Path, command: str, field: str, what: str | None = None) -> Owner | None:
    """The guard every command runs before writing: None for a new run (absent or empty directory), the owner when
    ``command`` owns it; a directory of another command or of none is refused (ConfigError, nothing touched).

    The refusal reads ``<field>: <dir> exists and is not empty, and is not a <what> output directory (it holds
    ...); choose another directory``.
    """
    check_writable(directory, field)
    owner = owner_of(directory)
    if owner is None or owner.command == command:
        return owner
    what = what or command
    raise ConfigError(f"{field}: {directory} exists and is not empty, and is not a {what} output directory "
                      f"(it holds {owner.describe()}); choose another directory")


def differing(owner: Owner, settings: dict[str, Any]) -> list[str]:
    """Keys of ``settings`` whose values differ from those recorded by ``owner`` (none when they are unknown)."""
    if owner.settings is None:
        return []
    now = json.loads(json.dumps(settings))
    return sorted(k for k in set(owner.settings) | set(now) if owner.settings.get(k) != now.get(k))


def claim(directory: str | Path, command: str, settings: dict[str, Any] | None = None,
          finished: bool = False) -> None:
    """Records ``command`` as the owner of ``directory`` (created if absent), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / MARKER, {"command": command, "version": VERSION,
                                            "settings": json.loads(json.dumps(settings or {})),
                                            "state": "finished" if finished else "running"})


def mark_finished(directory: str | Path) -> None:
    """Sets the marker's state to finished (a directory without one gets none: nothing else rewrites it)."""
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return
    data = json.loads(marker.read_text())
    data["state"] = "finished"
    atomic_write_json(marker, data)


def remove_owned(directory: str | Path, command: str) -> list[str]:
    """Removes what ``command`` writes in ``directory`` (its :attr:`Kind.entries` and the marker) and nothing else;
    returns the names removed. Call it only for a directory that :func:`check` gave to ``command``."""
    directory = Path(directory)
    removed = []
    for pattern in KINDS[command].entries:
        for path in sorted(directory.glob(pattern)):
            if path.name == MARKER:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    (directory / MARKER).unlink(missing_ok=True)
    return removed
