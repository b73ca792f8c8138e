"""The one output-directory flow (kd_core.ownership.prepare) and its lock (kd_core.dirlock), on plain directories:
which directories a command may resume, replace or never touch, one writer at a time (also across real processes,
and free again once a holder is killed), and a refused run leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd_core import ownership
from kd_core.config import ConfigError
from kd_core.dirlock import LOCK
from tests.conftest import REPO_ROOT, tree_digest

KIND = ownership.OutputKind(
    "test write", ("out.txt", "parts"), legacy=lambda d: (d / "out.txt").is_file(), done="out.txt"
)
OTHER = ownership.OutputKind("test other", ("*",))
PUBLISHED = ownership.OutputKind("test publish", ("*",), published=True)


def write(directory: Path, settings: dict | None = None, **flags) -> ownership.Output:
    """A whole run of KIND: prepare, claim, write, finish, release."""
    flags = {"resume": True, "overwrite": False, **flags}
    with ownership.prepare(directory, KIND, settings or {"a": 1}, **flags) as output:
        output.claim()
        (directory / "out.txt").write_text("done")
        output.finish()
    return output


def test_new_run_resume_other_settings_and_overwrite(tmp_path):
    out = tmp_path / "run"
    first = write(out)
    assert first.owner is None and not first.resumed
    assert json.loads((out / ownership.MARKER).read_text()) == {
        "command": "test write",
        "version": 1,
        "settings": {"a": 1},
        "state": "finished",
    }
    assert not (out / LOCK).exists()  # released: the lock file goes with the lock
    assert write(out).resumed
    before = tree_digest(out)
    with pytest.raises(ConfigError, match=r"output_dir: .*run holds a run with other settings \(a\); start again"):
        ownership.prepare(out, KIND, {"a": 2}, resume=True, overwrite=False, remedy="start again")
    with pytest.raises(ConfigError, match=r"output_dir: .*run exists and is not empty$"):
        ownership.prepare(out, KIND, {"a": 1}, resume=False, overwrite=False)
    assert tree_digest(out) == before
    (out / "parts").mkdir()
    (out / "notes.txt").write_text("the user's")
    replaced = ownership.prepare(out, KIND, {"a": 2}, resume=True, overwrite=True)
    assert replaced.replace and replaced.claim() == ["out.txt", "parts"]
    replaced.release()
    assert sorted(p.name for p in out.iterdir()) == [ownership.MARKER, "notes.txt"]  # only what KIND writes went


@pytest.mark.parametrize("overwrite", [False, True])
def test_another_commands_or_a_users_directory_is_never_touched(tmp_path, overwrite):
    other = tmp_path / "other"
    with ownership.prepare(other, OTHER, {}, resume=False, overwrite=False) as output:
        output.claim()
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    for directory, held in (
        (other, "an unfinished test other output"),
        (users, "files not written by this command, and no ownership marker"),
    ):
        before = tree_digest(directory)
        with pytest.raises(ConfigError, match=f"is not a test write output directory \\(it holds {held}\\)"):
            ownership.prepare(directory, KIND, {}, resume=True, overwrite=overwrite)
        assert tree_digest(directory) == before


def test_an_unmarked_output_of_an_earlier_version_is_recognised_by_its_own_command_only(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "out.txt").write_text("done")
    owner = ownership.owner_of(out, KIND)
    assert (owner.command, owner.finished, owner.inferred, owner.settings) == ("test write", True, True, None)
    assert ownership.owner_of(out, OTHER).command is None
    assert write(out).resumed


def test_a_refused_run_leaves_nothing_not_even_the_directory(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(ValueError, match="bad input"):
        with ownership.prepare(out, KIND, {}, resume=True, overwrite=False):
            assert (out / LOCK).is_file()  # locked while the inputs are checked
            raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty"  # an empty directory of the user's stays, empty
    empty.mkdir()
    ownership.prepare(empty, KIND, {}, resume=True, overwrite=False).release()
    assert empty.is_dir() and list(empty.iterdir()) == []


def test_one_writer_per_directory_in_this_process(tmp_path):
    out = tmp_path / "run"
    with ownership.prepare(out, KIND, {}, resume=True, overwrite=False) as first:
        first.claim()
        assert ownership.held(out) is first
        before = tree_digest(out)
        with pytest.raises(
            ConfigError,
            match=rf"output_dir: .*run is being written by pid {os.getpid()} on .*, "
            r"test write, since .*; wait for it to end, or choose another",
        ):
            ownership.prepare(out, KIND, {}, resume=True, overwrite=True)
        assert tree_digest(out) == before
        # Not the main process of a launch: checks only, never locks (the main process holds the lock).
        assert ownership.prepare(out, KIND, {}, resume=True, overwrite=False, lock=False).resumed
    assert ownership.held(out) is None


def test_a_published_output_is_locked_beside_it_and_exists_only_once_complete(tmp_path):
    out = tmp_path / "models" / "pruned"
    with ownership.prepare(out, PUBLISHED, {}, resume=False, overwrite=False) as output:
        assert not out.exists() and (out.parent / f".pruned{LOCK}").is_file()
        with pytest.raises(ConfigError, match="is being written by pid"):
            ownership.prepare(out, PUBLISHED, {}, resume=False, overwrite=False)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"weights")
        assert output.path == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned"]


HOLDER = """
import sys, time
from pathlib import Path
from kd_core import ownership
kind = ownership.OutputKind("test holder", ("*",))
output = ownership.prepare(sys.argv[1], kind, {}, resume=False, overwrite=False)
output.claim()
Path(sys.argv[2]).touch()
time.sleep(600)
"""


def test_another_process_is_refused_naming_it_and_a_killed_holder_frees_the_directory(tmp_path):
    out, ready = tmp_path / "run", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists()
        before = tree_digest(out)
        kind = ownership.OutputKind("test holder", ("*",))
        with pytest.raises(ConfigError, match=rf"is being written by pid {holder.pid} on .*, test holder, since"):
            ownership.prepare(out, kind, {}, resume=True, overwrite=True)
        assert tree_digest(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the lock with the process: the killed run's directory resumes (its stale lock file reused).
    assert (out / LOCK).is_file()
    kind = ownership.OutputKind("test holder", ("*",))
    with ownership.prepare(out, kind, {}, resume=True, overwrite=False) as output:
        assert output.resumed and not output.owner.finished
    assert not (out / LOCK).exists()


def test_a_field_added_by_an_upgrade_does_not_stop_a_resume():
    """A run recorded before a field existed resumes while the field holds its default; a non-default value, a
    changed value, or an entry of a dict-valued field (a value compared whole, not a section) still differs."""
    import dataclasses

    from kd_core.config import option, section

    @dataclasses.dataclass
    class Inner:
        old: int = option(1, help="h")
        added: str | None = option(None, help="h")

    @dataclasses.dataclass
    class Config:
        k: int = option(64, help="h")
        terms: dict = option({"kl": 1.0}, help="h")
        inner: Inner = section(Inner, help="h")
        new_top: str = option("", help="h")

    defaults = ownership.defaults_of(Config)
    recorded = {"k": 64, "terms": {"kl": 1.0, "ce": 0.1}, "inner": {"old": 1}}  # before `added` and `new_top`
    now = {"k": 64, "terms": {"kl": 1.0, "ce": 0.1}, "inner": {"old": 1, "added": None}, "new_top": ""}
    assert ownership.changed(recorded, now, defaults) == []
    assert ownership.changed(recorded, now) == ["inner", "new_top"]  # without defaults: as before
    assert ownership.changed(recorded, {**now, "new_top": "x"}, defaults) == ["new_top"]
    assert ownership.changed(recorded, {**now, "inner": {"old": 1, "added": "y"}}, defaults) == ["inner"]
    assert ownership.changed({**recorded, "terms": {"ce": 0.1}}, now, defaults) == ["terms"]
    assert ownership.changed({**recorded, "gone": 3}, now, defaults) == ["gone"]  # a removed field's setting
