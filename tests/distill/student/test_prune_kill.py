"""``distill prune`` killed with SIGKILL while it saves the pruned model and just before it publishes it, then run
again: the output equals an uninterrupted run's, and no kill leaves an output directory (or a temporary one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from distill.student.tiny import tiny_llama
from tests.conftest import REPO_ROOT, kill_9, tree_digest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_kill_9_while_saving_then_rerun(tokenizer, tmp_path):
    teacher = tmp_path / "teacher"  # larger than the suite's tiny teacher: the save lasts long enough to land a kill
    tiny_llama(
        len(tokenizer), hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024
    ).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps({"text": f"The number {i} is followed by {i + 1}."}) + "\n" for i in range(32)))
    out, cache = tmp_path / "pruned", tmp_path / "cache"
    command = [
        sys.executable,
        "-m",
        "distill",
        "prune",
        "--model",
        str(teacher),
        "--output-dir",
        str(out),
        "--depth.num_layers",
        "3",
        "--width.intermediate_size",
        "512",
        "--calibration.data",
        str(data),
        "--cache_dir",
        str(cache),
    ]
    reference = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = tree_digest(out)
    expected_report = json.loads((out / "prune_report.json").read_text())
    out.rename(tmp_path / "reference")  # the same path for every run: prune_config.yaml names it

    def saving() -> bool:
        return any(tmp_path.glob(f".{out.name}.*.tmp"))

    assert kill_9(command, ENV, until=saving)  # save_pretrained under way in the temporary directory
    assert kill_9(command, ENV, point=f"publish:{out.name}")  # everything written, not yet renamed into place
    assert not out.exists()  # never a model directory without its weights
    assert any(tmp_path.glob(f".{out.name}.*.tmp"))
    final = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not list(tmp_path.rglob("*.tmp"))
    report = json.loads((out / "prune_report.json").read_text())
    # The killed runs stored the importance: the rerun reads it back (hit), the figures are the same.
    assert report.pop("importance_cache")["hit"] is True and expected_report.pop("importance_cache")["hit"] is False
    assert report == expected_report
    digest = tree_digest(out)
    del digest["prune_report.json"], expected["prune_report.json"]
    assert digest == expected  # weights, tokenizer, config, marker: byte for byte
