"""Atomic, durable writes of files and directories: the one place the project writes anything it later trusts.

A reader, or a resumed run, sees either the old content or the new one, never half of a file, and once a call
returns the new content survives a power cut. Every write goes the same way:

1. into a temporary name in the destination's own directory (``.<name>.<random>.tmp``: hidden, so globs such as
   ``*.jsonl`` or ``checkpoint-*`` never pick it up, and on the same file system, so the rename is atomic);
2. flush and ``os.fsync`` of the file (or, for a directory, of every file and directory in it);
3. ``os.replace`` onto the destination;
4. ``os.fsync`` of the destination's directory, so that the rename itself is on disk (without it a crash can
   leave the old directory entry, or none, although the data blocks were written).

A write that fails part-way (an exception, including KeyboardInterrupt) removes its temporary file or directory and
leaves the destination untouched. Appending journals (``data_gen.journal``, ``metrics.jsonl``) are not written here:
they append and fsync each line, which keeps every line already written.

Entry points: :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json` for whole contents;
:func:`atomic_open` for writers that want a file handle; :func:`atomic_path` for writers that take a file name
(pyarrow, safetensors); :func:`atomic_directory` for writers that fill a directory (``save_pretrained``), and
:func:`publish_directory` for a temporary directory that several processes fill (checkpoints).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal


def _temporary_sibling(path: Path) -> Path:
    # A random part, so that concurrent writers of the same destination (two ranks, two runs) never share a name.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _reserve_file(path: Path) -> Path:
    """Creates an empty temporary file beside ``path`` and returns its name.

    Created with mode 0o666 less the umask, as ``open(path, "w")`` would (``tempfile.mkstemp`` would make it 0o600,
    and the file keeps that mode after the rename)."""
    while True:
        tmp = _temporary_sibling(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # practically never: 48 random bits
            continue
        os.close(fd)
        return tmp


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Makes the entries of ``directory`` (a rename into it, a new file) durable."""
    if os.name != "posix":  # directories cannot be opened for fsync on Windows; NTFS journals renames itself
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(directory: str | os.PathLike[str]) -> None:
    """fsyncs every file under ``directory``, then every directory, deepest first, ``directory`` itself last."""
    directory = Path(directory)
    subdirectories = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_file():
            _fsync_file(path)
        elif path.is_dir():
            subdirectories.append(path)
    for path in sorted(subdirectories, key=lambda p: len(p.parts), reverse=True):
        fsync_directory(path)
    fsync_directory(directory)


@contextlib.contextmanager
def _staged_file(path: Path) -> Iterator[Path]:
    """A reserved temporary name beside ``path``; renamed onto ``path`` when the block succeeds (the caller has
    fsynced it), removed when it fails."""
    tmp = _reserve_file(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file name for writers that open the file themselves (``pyarrow.parquet.write_table``,
    ``safetensors.torch.save_file``); when the block ends it is fsynced and renamed onto ``path``.

    The name exists (empty) when the block starts; writers overwrite it."""
    with _staged_file(Path(path)) as tmp:
        yield tmp
        _fsync_file(tmp)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: Literal["w", "wb"] = "w", encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """A file handle whose content replaces ``path`` when the block ends (flushed and fsynced first)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    with _staged_file(Path(path)) as tmp:
        with open(tmp, mode, encoding=encoding if mode == "w" else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replaces ``path`` with ``data``, atomically and durably."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replaces ``path`` with ``text``, atomically and durably."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 1,
    ensure_ascii: bool = True,
    trailing_newline: bool = False,
) -> None:
    """``json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii)`` (plus ``"\\n"`` with ``trailing_newline``)
    written with :func:`atomic_write_text`. The text is built before the file is touched, so an object that does
    not serialise leaves the old file as it was."""
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii)
    atomic_write_text(path, text + "\n" if trailing_newline else text)


def publish_directory(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Moves the finished directory ``tmp`` onto ``final`` (which must be absent, or empty on POSIX): everything in
    it is fsynced first, the parent directory after the rename.

    For temporary directories that have to keep a known name, e.g. a checkpoint that every process of a
    distributed job writes into before the main one publishes it."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_directory(final.parent)


def remove_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Removes the temporary files and directories (``.<name>.<random>.tmp``) that writers of ``path`` killed
    mid-write (kill -9, preemption) left beside it; returns them. Only for a destination with a single writer at a
    time (an output the command owns): a concurrent writer's temporary would be removed too."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for entry in stale:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new, empty temporary directory beside ``path`` to fill; published onto ``path`` with
    :func:`publish_directory` when the block succeeds, deleted when it fails.

    ``path`` must not exist when the block ends (an empty directory is replaced on POSIX); its parent must exist
    when the block starts."""
    path = Path(path)
    # A writer killed mid-block (kill -9, preemption) leaves its temporary directory behind; it can be large (a model
    # export), and no one else writes this path (each output directory has one owner), so clear it first.
    remove_temporaries(path)
    while True:
        tmp = _temporary_sibling(path)
        try:
            tmp.mkdir()
        except FileExistsError:  # practically never: 48 random bits
            continue
        break
    try:
        yield tmp
        publish_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
