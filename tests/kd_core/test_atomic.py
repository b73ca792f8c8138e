"""kd_core.atomic: complete content after the call, the old file untouched and no temporary left after a failure,
and the file and its directory entry fsynced."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kd_core.atomic import (
    atomic_directory,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    publish_directory,
)


class Boom(Exception):
    pass


@pytest.fixture
def fsyncs(monkeypatch) -> list[str]:
    """Records every os.fsync as 'dir:<path>' or 'file:<path>' (resolved through /proc/self/fd), then fsyncs."""
    calls: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append(f"{kind}:{os.readlink(f'/proc/self/fd/{fd}')}")
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_text_bytes_and_json_are_complete_after_the_call(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n" * 1000)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n" * 1000
    atomic_write_bytes(tmp_path / "b.bin", bytes(range(256)) * 10)
    assert (tmp_path / "b.bin").read_bytes() == bytes(range(256)) * 10
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2], "é": 1}, ensure_ascii=False, trailing_newline=True)
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    assert text == json.dumps({"x": [1, 2], "é": 1}, indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(tmp_path / "a.txt", "replaced")  # over an existing file
    assert (tmp_path / "a.txt").read_text() == "replaced"
    assert leftovers(tmp_path) == []


def test_new_files_get_the_usual_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "a.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_an_exception_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_open(target) as handle:
            handle.write("half of the new")
            raise Boom
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise Boom
    with pytest.raises(TypeError):  # not serialisable: fails before the file is touched
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_open(tmp_path / "new.jsonl") as handle:
            handle.write("{}\n")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_file_and_directory_entry_are_fsynced(tmp_path, fsyncs):
    target = tmp_path / "stats.json"
    atomic_write_json(target, {"done": 3})
    files = [c for c in fsyncs if c.startswith("file:")]
    assert len(files) == 1 and Path(files[0][5:]).parent == tmp_path  # the temporary, before its rename
    assert fsyncs[-1] == f"dir:{tmp_path}"  # the rename itself, after it
    fsyncs.clear()
    with atomic_path(tmp_path / "t.bin") as tmp:
        tmp.write_bytes(b"x")
    assert [c.split(":")[0] for c in fsyncs] == ["file", "dir"] and fsyncs[-1] == f"dir:{tmp_path}"


def test_atomic_directory_publishes_complete_or_nothing(tmp_path, fsyncs):
    final = tmp_path / "model"
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir() and not final.exists()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")
    assert (final / "sub" / "weights.bin").read_bytes() == b"w" and (final / "config.json").read_text() == "{}"
    assert sum(c.startswith("file:") for c in fsyncs) == 2
    assert f"dir:{tmp_path}" == fsyncs[-1]  # the parent, after the rename
    with pytest.raises(Boom):
        with atomic_directory(tmp_path / "other") as tmp:
            (tmp / "config.json").write_text("{}")
            raise Boom
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_directory_keeps_the_given_temporary_name(tmp_path):
    tmp = tmp_path / ".checkpoint-3.tmp"
    tmp.mkdir()
    (tmp / "trainer_state.json").write_text("{}")
    publish_directory(tmp, tmp_path / "checkpoint-3")
    assert (tmp_path / "checkpoint-3" / "trainer_state.json").is_file() and not tmp.exists()


def test_a_killed_writers_temporary_directory_is_cleared_by_the_next_write(tmp_path):
    from kd_core.atomic import atomic_directory

    leftover = tmp_path / ".export.0123456789ab.tmp"  # what a kill -9 inside the block leaves
    (leftover / "weights").mkdir(parents=True)
    unrelated = tmp_path / ".other.0123456789ab.tmp"
    unrelated.mkdir()
    with atomic_directory(tmp_path / "export") as staging:
        (staging / "model.bin").write_bytes(b"x")
    assert (tmp_path / "export" / "model.bin").read_bytes() == b"x"
    assert not leftover.exists() and unrelated.exists()
