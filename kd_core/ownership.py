"""Output directories: the one flow every writing command runs: who owns a directory, one writer at a time, whether
a run may resume there, and what ``--overwrite`` removes.

A command declares its output in its own module, an :class:`OutputKind`: its name, the top-level entries it writes
(globs: what ``--overwrite`` removes) and how its output of a version before markers is recognised. This module
knows no command. Every command goes the same way::

    output = ownership.prepare(cfg.output_dir, OUTPUT, settings, resume=..., overwrite=...)  # checks, then locks
    try:
        ...                 # the inputs are checked: nothing written yet, so a refusal leaves nothing behind
        output.claim()      # the main process: --overwrite removes what the command wrote; the marker says running
        ...                 # the writing
        output.finish()     # the marker says finished
    finally:
        output.release()    # the lock; a directory this run created and never claimed is removed again

The marker, :data:`MARKER` (``.kd_owner.json``, written with :mod:`kd_core.atomic`)::

    {"command": "distill train", "settings": {"loss.terms": {...}, ...}, "state": "running", "version": 1}

``settings`` are the values that must equal the new run's for it to resume there. The rules, the same for every
command:

* an absent or empty directory is a new run;
* a directory that another process is writing is refused, naming its pid and command (:mod:`kd_core.dirlock`);
* a directory owned by another command, or by none (a user's folder, or another command's output of a version before
  markers), is refused whatever ``--overwrite`` says;
* a directory of the same command resumes when the command resumes (``resume``), the settings match and the
  command's own ``check`` finds nothing; otherwise ``overwrite`` replaces it (removing only the entries its
  :attr:`OutputKind.owned` names, and the marker) or it is refused.

Every refusal is one :class:`~kd_core.config.ConfigError` (exit 2) and leaves the directory as it was. Under a
multi-process launch only the main process locks and writes (``lock=False`` elsewhere): it takes the lock before the
process group forms, so the other ranks wait for it at the rendezvous, and the launcher stops them if it refuses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_core.atomic import atomic_write_json
from kd_core.config import ConfigError
from kd_core.dirlock import LOCK, Busy, DirectoryLock

MARKER = ".kd_owner.json"
VERSION = 1


@dataclass(frozen=True)
class OutputKind:
    """What a command writes in its output directory; declared by the command, passed to :func:`prepare`."""

    command: str  # "distill train": recorded in the marker and the lock, named in refusals
    owned: tuple[str, ...]  # globs of the top-level entries it writes: what --overwrite removes ("*": all of it)
    label: str = ""  # how refusals name it ("is not a <label> output directory"); default: the command
    legacy: Callable[[Path], bool] | None = None  # recognises its unmarked output of a version before markers
    done: str | None = None  # the file whose presence means such an unmarked output is finished
    # Written to a temporary sibling and renamed into place when complete (a model directory): the directory exists
    # only once finished, so its lock file lives beside it (.<name>.kd_lock), and it is never resumed.
    published: bool = False

    @property
    def name(self) -> str:
        return self.label or self.command


@dataclass
class Owner:
    """Who wrote a non-empty directory."""

    command: str | None  # None: no marker, and not this command's earlier output (a user's folder, or unknown)
    settings: dict[str, Any] | None  # None: unknown (an unmarked directory of an earlier version)
    finished: bool
    inferred: bool  # True: recognised by its content (no marker)

    def describe(self) -> str:
        if self.command is None:
            return "files not written by this command, and no ownership marker"
        state = "a finished" if self.finished else "an unfinished"
        return f"{state} {self.command} output"


def contents(directory: Path) -> list[Path]:
    """The entries of an existing directory, less a lock file (a killed run's, or the current holder's)."""
    return [p for p in directory.iterdir() if p.name != LOCK]


def owner_of(directory: str | Path, kind: OutputKind | None = None) -> Owner | None:
    """The owner of ``directory``; None when it is absent or empty. Without a marker, ``kind``'s legacy test says
    whether it is that command's earlier output. A path that is a file is a ConfigError."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory")
    if not directory.is_dir() or not contents(directory):
        return None
    marker = directory / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
            return Owner(data["command"], data.get("settings"), data.get("state") == "finished", False)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged marker: judge by the content, as for an earlier version
    if kind is not None and kind.legacy is not None and kind.legacy(directory):
        return Owner(kind.command, None, bool(kind.done and (directory / kind.done).exists()), True)
    return Owner(None, None, False, True)


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


class Defaults(dict):
    """The defaults of a config's fields, its sections as nested :class:`Defaults` (:func:`defaults_of`). Given to
    :func:`prepare`, a setting recorded on one side only (a field added, or removed, since the run began: an upgrade
    in the middle of a run) counts as unchanged when the other side holds the field's default. Dict-valued fields
    (``loss.terms``) are plain values, compared whole."""


_ABSENT = object()


def defaults_of(cls: type) -> Defaults:
    """:class:`Defaults` of the config dataclass ``cls``, as JSON would record them."""
    out = Defaults()
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out[f.name] = defaults_of(f.default_factory)  # a section: never built here (its checks may refuse)
            continue
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value):
            out[f.name] = defaults_of(type(value))
        else:
            out[f.name] = json.loads(json.dumps(value, default=str))
    return out


def _same(then: Any, now: Any, default: Any) -> bool:
    if isinstance(default, Defaults) and isinstance(then, dict) and isinstance(now, dict):
        keys = set(then) | set(now)
        return all(_same(then.get(k, _ABSENT), now.get(k, _ABSENT), default.get(k, _ABSENT)) for k in keys)
    then = default if then is _ABSENT else then
    now = default if now is _ABSENT else now
    return then is not _ABSENT and now is not _ABSENT and then == now


def changed(then: dict[str, Any], now: dict[str, Any], defaults: Defaults | None = None) -> list[str]:
    """Top-level keys whose settings differ between a recorded ``then`` and ``now`` (see :class:`Defaults`)."""
    now = json.loads(json.dumps(now))
    base = defaults if defaults is not None else Defaults()
    return sorted(
        k for k in set(then) | set(now) if not _same(then.get(k, _ABSENT), now.get(k, _ABSENT), base.get(k, _ABSENT))
    )


def differing(owner: Owner, settings: dict[str, Any], defaults: Defaults | None = None) -> list[str]:
    """Keys of ``settings`` whose values differ from those recorded by ``owner`` (none when they are unknown)."""
    if owner.settings is None:
        return []
    return changed(owner.settings, settings, defaults)


def claim(directory: str | Path, command: str, settings: dict[str, Any] | None = None, finished: bool = False) -> None:
    """Records ``command`` as the owner of ``directory`` (created if absent), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        directory / MARKER,
        {
            "command": command,
            "version": VERSION,
            "settings": json.loads(json.dumps(settings or {})),
            "state": "finished" if finished else "running",
        },
    )


def mark_finished(directory: str | Path) -> None:
    """Sets the marker's state to finished (a directory without one gets none: nothing else rewrites it)."""
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return
    data = json.loads(marker.read_text())
    data["state"] = "finished"
    atomic_write_json(marker, data)


def remove_owned(directory: str | Path, kind: OutputKind) -> list[str]:
    """Removes what ``kind`` writes in ``directory`` (its :attr:`OutputKind.owned` and the marker) and nothing else;
    returns the names removed. Only for a directory that :func:`prepare` gave to ``kind``."""
    directory = Path(directory)
    removed = []
    for pattern in kind.owned:
        for path in sorted(directory.glob(pattern)):
            if path.name in (MARKER, LOCK):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    (directory / MARKER).unlink(missing_ok=True)
    return removed


# The outputs this process holds, by resolved path (see held()).
_HELD: dict[Path, Output] = {}


@dataclass
class Output:
    """A prepared output directory: what was there, what the run does with it, and (main process) its lock."""

    path: Path
    kind: OutputKind
    settings: dict[str, Any]
    owner: Owner | None  # what was there before this run; None: a new run
    replace: bool  # an own directory that --overwrite starts again: claim() removes what the command wrote
    lock: DirectoryLock | None = None
    created: Path | None = None  # the outermost directory this run created (removed by release() if never claimed)
    claimed: bool = field(default=False, init=False)

    @property
    def resumed(self) -> bool:
        """The run continues what is in the directory."""
        return self.owner is not None and not self.replace

    def claim(self) -> list[str]:
        """Main process, once the inputs are checked: removes the previous output if it is replaced, records this
        run as the owner (state running); returns the names removed."""
        removed = remove_owned(self.path, self.kind) if self.replace else []
        claim(self.path, self.kind.command, self.settings)
        self.claimed = True
        return removed

    def finish(self) -> None:
        mark_finished(self.path)

    def release(self) -> None:
        """Unlocks; a directory this run created and never claimed is removed (a refused run leaves nothing)."""
        if _HELD.get(self.path.resolve()) is self:
            del _HELD[self.path.resolve()]
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created is None or self.claimed:
            return
        home = self.path.parent if self.kind.published else self.path
        for directory in (home, *home.parents):  # the empty directories this run made, innermost first
            if not directory.is_dir() or any(directory.iterdir()):
                return
            directory.rmdir()
            if directory == self.created:
                return

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def main_process() -> bool:
    """Whether this is the main process of a launch, known before any process group exists: torchrun (under
    ``accelerate launch``) and DeepSpeed's launcher give every rank its ``RANK``; a plain process has none."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def held(output_dir: str | Path) -> Output | None:
    """The prepared output of ``output_dir`` whose lock this process holds, if any: for code that checks a directory
    again (a second prepare() would be refused by the process's own lock) or claims it far from where it was
    prepared."""
    path = Path(output_dir)
    return _HELD.get(path.resolve()) if path.exists() else None


def prepare(
    output_dir: str | Path,
    kind: OutputKind,
    settings: dict[str, Any],
    resume: bool,
    overwrite: bool,
    *,
    field: str = "output_dir",
    remedy: str = "",
    check: Callable[[Owner], str | None] | None = None,
    lock: bool | None = None,
    defaults: Defaults | None = None,
) -> Output:
    """Checks ``output_dir`` for a run of ``kind`` (the rules of the module docstring) and, with ``lock`` (the main
    process), creates it if absent and takes its lock, checking again under the lock. Raises one ConfigError.

    ``check(owner)`` is the command's own test of a directory it owns: a reason it cannot be resumed (replaced with
    ``overwrite``, else refused with ``remedy``), or None; it may raise ConfigError to refuse it outright.
    ``remedy`` ends the refusal of an own directory (e.g. "pass --resume auto to continue it"). ``lock`` defaults to
    :func:`main_process`. ``defaults``: the command config's :func:`defaults_of`, so that a field added by an upgrade
    (at its default) does not stop an unfinished run from resuming."""
    path = Path(output_dir)
    lock = main_process() if lock is None else lock
    check_writable(path, field)
    decide = functools.partial(_decide, path, kind, settings, resume, overwrite, field, remedy, check, defaults)
    if not lock:
        return Output(path, kind, settings, *decide())
    home = path.parent if kind.published else path  # the directory the lock file is in
    created = None
    for directory in (home, *home.parents):
        if directory.exists():
            break
        created = directory
    home.mkdir(parents=True, exist_ok=True)
    output = Output(path, kind, settings, None, False, created=created)
    try:
        output.lock = DirectoryLock.acquire(home / (f".{path.name}{LOCK}" if kind.published else LOCK), kind.command)
    except Busy as busy:
        output.release()
        raise ConfigError(
            f"{field}: {path} is being written by {busy.describe()}; wait for it to end, or choose another directory"
        ) from None
    try:
        output.owner, output.replace = decide()
    except BaseException:
        output.release()
        raise
    _HELD[path.resolve()] = output
    return output


def _decide(
    path: Path,
    kind: OutputKind,
    settings: dict[str, Any],
    resume: bool,
    overwrite: bool,
    field: str,
    remedy: str,
    check: Callable[[Owner], str | None] | None,
    defaults: Defaults | None = None,
) -> tuple[Owner | None, bool]:
    """(the owner, whether the run replaces its output) of an own or new directory; a ConfigError otherwise."""
    owner = owner_of(path, kind)
    if owner is None:
        return None, False
    if owner.command != kind.command:
        raise ConfigError(
            f"{field}: {path} exists and is not empty, and is not a {kind.name} output directory "
            f"(it holds {owner.describe()}); choose another directory"
        )
    problem = check(owner) if check is not None else None
    if problem is None and not resume:
        problem = "exists and is not empty"
    different = differing(owner, settings, defaults) if problem is None else []
    if different:
        problem = f"holds a run with other settings ({', '.join(different)})"
    if problem is None or overwrite:
        return owner, problem is not None
    raise ConfigError(f"{field}: {path} {problem}" + (f"; {remedy}" if remedy else ""))
