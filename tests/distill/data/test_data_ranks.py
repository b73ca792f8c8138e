"""Two real processes (torchrun, gloo) share one tokenized cache: the first rank builds it while the other waits,
both map the same examples, and a bad row is the same one-line error on both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CORPUS, REPO_ROOT, free_port, write_jsonl


def rank_main(data: str, cache: str, tokenizer_dir: str, report: str) -> None:
    """One rank: records whether it tokenized, what it got (or the error), as JSON in ``report``-RANK."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from distill.data import tokenized
    from distill.data.datasets import DataSettings, build_datasets
    from kd_core.config import ConfigError

    dist.init_process_group("gloo")
    built = []
    real_build = tokenized._build
    tokenized._build = lambda *args: built.append(True) or real_build(*args)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = DataSettings(train_file=data, eval_fraction=0.25, cache_dir=cache)
    try:
        train, evaluation = build_datasets(settings, tokenizer, seed=1)
        result = {"train": [e["input_ids"] for e in train], "eval": [e["sample_id"] for e in evaluation]}
    except ConfigError as err:
        result = {"error": str(err)}
    Path(f"{report}-{dist.get_rank()}").write_text(json.dumps({"built": bool(built), **result}))
    dist.destroy_process_group()


def launch(tmp_path: Path, data: Path, tokenizer) -> list[dict]:
    tokenizer.save_pretrained(tmp_path / "tok")
    report = tmp_path / "report"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        __file__,
        str(data),
        str(tmp_path / "cache"),
        str(tmp_path / "tok"),
        str(report),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(Path(f"{report}-{rank}").read_text()) for rank in (0, 1)]


def test_first_rank_builds_the_other_waits_and_maps_the_same(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": CORPUS[i], "completion": f"a{i}"} for i in range(24)])
    first, second = launch(tmp_path, data, tokenizer)
    assert first["built"] and not second["built"]
    assert first["train"] == second["train"] and first["eval"] == second["eval"] and len(first["eval"]) == 6
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one cache, no error verdict, no temporary left


def test_a_bad_row_is_the_same_error_on_every_rank(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)] + [{"prompt": "q", "completion": 7}]
    first, second = launch(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    assert first["built"] and not second["built"]
    assert first["error"] == second["error"]
    assert first["error"].endswith("d.jsonl:9: field 'completion': expected a string, got int 7")


if __name__ == "__main__":
    rank_main(*sys.argv[1:])
