"""``distill precompute`` killed with SIGKILL at several points, then run again: the store equals an uninterrupted
run's, byte for byte, and no killed run leaves a store that training trusts."""

from __future__ import annotations

import os
import sys

import pytest

from distill.offline.store import LogitStore, shard_names
from kd_core.config import ConfigError
from tests.conftest import addition_rows, kill_9, tree_digest, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_kill_9_at_several_points_then_rerun(model_dirs, tmp_path):
    import subprocess

    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(300))  # enough batches to land a kill mid-shard
    out = tmp_path / "store"
    command = [sys.executable, "-m", "distill", "precompute", "--teacher", str(model_dirs["teacher"]),
               "--output_dir", str(out), "--k", "8", "--batch_size", "1", "--data.train_file", str(data),
               "--data.eval_fraction", "0.0"]
    reference = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = tree_digest(out)
    out.rename(tmp_path / "reference")  # the same path for every run: precompute_config.yaml names it

    data_name, index_name = shard_names(0, 1)

    def mid_shard() -> bool:
        return (out / data_name).is_file() and (out / data_name).stat().st_size > 0

    points = [dict(until=mid_shard), dict(point=f"reserve:{index_name}"), dict(point="reserve:store.json")]
    for where in points:
        assert kill_9(command, ENV, **where), f"the run ended before the kill at {where}"
        assert out.is_dir() and not (out / "store.json").exists()
        with pytest.raises(ConfigError, match="not found"):  # training refuses the partial store
            LogitStore(out)
    final = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "interrupted precompute" in final.stderr
    assert tree_digest(out) == expected  # same files, same bytes: nothing duplicated, no temporary file left
    assert not [p for p in tmp_path.rglob("*.tmp")]
    LogitStore(out)
