"""``distill precompute`` killed with SIGKILL at several points, then run again: committed segments are kept (never
recomputed), the rest is computed, and the store equals an uninterrupted run's, byte for byte; no killed run leaves
a store that training trusts; a rerun with other settings is refused and changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distill.offline.segments import names
from distill.offline.store import LogitStore
from kd_core.config import ConfigError
from tests.conftest import addition_rows, kill_9, tree_digest, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
SEGMENTS = 8  # 300 examples, 40 per segment


def precompute_command(model_dirs, data, out, *extra: str) -> list[str]:
    return [
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
        "--batch_size",
        "3",
        "--segment_samples",
        "40",
        "--data.train_file",
        str(data),
        "--data.eval_fraction",
        "0.0",
        *extra,
    ]


def identities(out, numbers) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file of the segments: a segment written again gets a new inode (atomic rename)."""
    stats = {name: (out / name).stat() for n in numbers for name in names(n)}
    return {name: (stat.st_ino, stat.st_mtime_ns) for name, stat in stats.items()}


def test_kill_9_at_several_points_then_rerun_keeps_committed_segments(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(300))
    out = tmp_path / "store"
    command = precompute_command(model_dirs, data, out)
    reference = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = tree_digest(out)
    assert len(LogitStore(out).meta["shards"]) == SEGMENTS
    out.rename(tmp_path / "reference")  # the same path for every run: precompute_config.yaml names it

    # 1. Held as it commits segment 3: segments 0-2 are committed, 3 has its data and index but no record.
    assert kill_9(command, ENV, point=f"reserve:{names(3)[2]}")
    committed = identities(out, range(3))
    assert not (out / names(3)[2]).exists() and (out / names(3)[0]).exists()

    # 2. Other settings over the partial store: one line, exit 2, nothing changed.
    def content() -> dict[str, str]:  # less the killed run's stale lock file, which the refused run clears
        return {name: digest for name, digest in tree_digest(out).items() if name != ".kd_lock"}

    before = content()
    other = subprocess.run(
        precompute_command(model_dirs, data, out, "--k", "4"), env=ENV, capture_output=True, text=True, timeout=300
    )
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert other.returncode == 2 and len(errors) == 1, other.stderr[-3000:]
    assert "holds a run with other settings (k)" in errors[0] and "--overwrite" in errors[0]
    assert content() == before

    # 3. Mid-segment (a segment's data file half written), then 4. as store.json is about to be written.
    def mid_segment() -> bool:
        return any(p.stat().st_size > 0 for p in out.glob(".segment-*.bin.*.tmp"))

    assert kill_9(command, ENV, until=mid_segment)
    assert kill_9(command, ENV, point="reserve:store.json")
    for _ in range(2):
        assert out.is_dir() and not (out / "store.json").exists()
        with pytest.raises(ConfigError, match="not found"):  # training refuses the partial store
            LogitStore(out)

    final = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"interrupted precompute; keeping {SEGMENTS} of {SEGMENTS} committed segments, computing 0" in final.stderr
    assert identities(out, range(3)) == committed  # the segments of the first run were never computed again
    assert tree_digest(out) == expected  # same files, same bytes: nothing duplicated, no temporary file left
    assert not list(tmp_path.rglob("*.tmp"))
    LogitStore(out)


def test_resumed_run_computes_only_the_missing_segments(model_dirs, tmp_path):
    """A rerun after a kill logs what it kept and computed; --overwrite with other settings starts again."""
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(300))
    out = tmp_path / "store"
    command = precompute_command(model_dirs, data, out)
    assert kill_9(command, ENV, point=f"reserve:{names(5)[2]}")
    committed = identities(out, range(5))
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"keeping 5 of {SEGMENTS} committed segments, computing 3" in rerun.stderr
    assert identities(out, range(5)) == committed

    # A finished store is never rewritten, --overwrite or not.
    again = subprocess.run([*command, "--overwrite", "true"], env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "holds a finished store" in again.stderr, again.stderr[-2000:]

    # --overwrite over a partial store of other settings removes its segments and starts again.
    partial = tmp_path / "partial"
    assert kill_9(precompute_command(model_dirs, data, partial), ENV, point=f"reserve:{names(2)[2]}")
    fresh = subprocess.run(
        [*precompute_command(model_dirs, data, partial, "--k", "4"), "--overwrite", "true"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "--overwrite: starting again" in fresh.stderr
    assert LogitStore(partial).k == 4
