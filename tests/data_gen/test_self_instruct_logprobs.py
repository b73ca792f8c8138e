"""``data-gen self-instruct`` with ``teacher.logprobs``: each input-first instance's output is found in its answer's
generated ids, its rows of the captured log-probabilities become one store sample, output-first rows are kept out of
the data files (and counted), and ``distill train``'s data layer lines the store up with the data. The teacher is
:class:`data_gen.testing.ForcedTeacher`: scripted texts, the real log-probabilities of the tiny teacher model. The
capture from a real vLLM serving SmolLM2 is in tests/data_gen/test_self_instruct_logprobs_vllm.py; instances are
matched to their tokens on SmolLM2's real tokenizer at the end."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from data_gen.self_instruct_text import input_first_instances
from data_gen.testing import ForcedTeacher
from kd_recipes.cli import data_gen_main
from tests.data_gen.test_self_instruct import WORDS, read_rows

K = 4


def script(body: dict) -> str:
    """The same answer for the same prompt; outputs begin and end with multi-byte characters (byte pieces)."""
    content = body["messages"][-1]["content"]
    rng = random.Random(hashlib.sha256(content.encode()).hexdigest())
    words = lambda n: " ".join(rng.sample(WORDS, n))  # noqa: E731
    if content.startswith("We are collecting"):
        return "\n".join(f"Task {9 + i}: Describe {words(9)}." for i in range(4))
    if content.endswith("Classification:"):
        return rng.choice([" Yes", "No."])
    if "classification task. First" in content:
        return f"Class label: {rng.choice(WORDS)}\nInput: {words(4)}\nClass label: other\nInput: {words(4)}"
    return f"Example 1\nInput: <none>\nOutput: ✓ {words(5)}\nExample 2\nInput: {words(3)}\nOutput:  {words(4)} café\n"


@pytest.fixture
def forced(model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["teacher"])
    bodies: list[dict] = []

    def recorded(body: dict) -> str:
        bodies.append(body)
        return script(body)

    teacher = ForcedTeacher(model, tokenizer, recorded)
    teacher.bodies = bodies
    server = teacher.serve()
    yield teacher, server
    server.stop()


def si_args(server, out, tokenizer_dir, *extra: str) -> list[str]:
    return [
        "self-instruct",
        "--target",
        "4",
        "--prompts_per_round",
        "2",
        "--teacher.model",
        "forced",
        "--teacher.base_url",
        server.base_url,
        "--teacher.api_key_env",
        "null",
        "--teacher.stream",
        "false",
        "--teacher.tokenizer",
        str(tokenizer_dir),
        "--output.dir",
        str(out),
        "--output.progress",
        "false",
        *extra,
    ]


def model_logprobs(teacher: ForcedTeacher, messages: list[dict], answer_ids: list[int]) -> torch.Tensor:
    """The tiny teacher's log-probabilities before each answer token, computed here from the chat prompt."""
    tok = teacher.tokenizer
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))["input_ids"]
    with torch.no_grad():
        logits = teacher.model(torch.tensor([list(prompt) + answer_ids])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_captures_input_first_rows_and_keeps_the_others_out(forced, model_dirs, tmp_path, capsys):
    from distill.data.datasets import DataSettings, tokenize_records
    from distill.offline.store import LogitStore
    from kd_core.records import iter_json_objects

    teacher, server = forced
    out = tmp_path / "si"
    assert data_gen_main(si_args(server, out, model_dirs["teacher"], "--teacher.logprobs", str(K))) == 0
    printed = capsys.readouterr().out
    rows = read_rows(out)
    stats = json.loads((out / "stats.json").read_text())
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    instances = [inst for record in journal for inst in record.get("instances", [])]
    kept_out = [inst for inst in instances if "uncaptured" in inst]
    assert rows and stats["rows"] == len(rows) and stats["kept_out"] == {"output_first": len(kept_out)}
    assert kept_out and all(inst["uncaptured"] == "output_first" for inst in kept_out)  # still in the journal
    assert f"{len(kept_out)} instances without captured log-probabilities kept out (output_first" in printed
    tok = teacher.tokenizer
    for row in rows:
        assert not row["is_classification"] and row["completion_vocab_sha256"]
        ids, (a, b) = row["completion_token_ids"], row["provenance"]["token_span"]
        assert len(ids) == b - a and tok.decode(ids).strip() == row["output"]
        assert row["output"].startswith("✓") or row["output"].endswith("café")
    # Every row is a store sample whose counted tokens are the row's ids (distill train's own check).
    data = out / "data.jsonl"
    store = LogitStore(out / "teacher_store")
    records = [record for _, _, record in iter_json_objects(data)]
    examples = tokenize_records(records, tok, DataSettings(), str(data))
    store.check_compatible(tok, len(tok), 1.0, str(data), examples)
    assert len(examples.examples) == len(rows) == store.meta["samples"]
    # Row t of a sample is the teacher's distribution before the t-th token, after the prompt and the answer so far.
    from data_gen.cache import AnswerCache
    from data_gen.logprobs import TokenLogprobs

    prompts = {script(body).strip(): body["messages"] for body in teacher.bodies}
    cache = AnswerCache(out / "cache.sqlite")
    for example, row in zip(examples.examples, rows):
        hit = cache.get(row["provenance"]["logprobs_key"])
        answer = TokenLogprobs.from_bytes(hit.logprobs).token_ids.tolist()
        a, b = row["provenance"]["token_span"]
        assert answer[a:b] == row["completion_token_ids"]
        expected = model_logprobs(teacher, prompts[hit.text.strip()], answer)
        got_ids, got_logp, _ = store.sample(example["sample_id"])
        for t, token in enumerate(row["completion_token_ids"]):
            stored = float(got_logp[t][list(got_ids[t]).index(token)])
            assert abs(stored - float(expected[a + t, token])) < 0.05, (row["id"], t)
    cache.close()

    # A rerun pays nothing and writes the same data and store.
    calls = server.total
    assert data_gen_main(si_args(server, out, model_dirs["teacher"], "--teacher.logprobs", str(K))) == 0
    assert server.total == calls and read_rows(out) == rows  # finished: the store is rebuilt from the cache


def test_distill_trains_a_step_from_the_store(forced, model_dirs, tmp_path):
    """The student (same tokenizer as the tiny teacher) trains on the rows' ids with the store's rows as targets."""
    _, server = forced
    out = tmp_path / "si"
    assert data_gen_main(si_args(server, out, model_dirs["teacher"], "--teacher.logprobs", str(K))) == 0
    run = tmp_path / "run"
    command = [sys.executable, "-m", "distill", "train", "--output_dir", str(run), "--report_to", "[none]"]
    command += ["--model.student", str(model_dirs["student"]), "--data.train_file", str(out / "data.parquet")]
    command += ["--data.eval_fraction", "0", "--loss.teacher_store", str(out / "teacher_store"), "--max_steps", "1"]
    command += ["--per_device_train_batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(metrics[-1]["train/loss"]) and metrics[-1]["step"] == 1


def test_capture_cannot_be_switched_on_or_off_in_a_run(forced, model_dirs, tmp_path, capsys):
    """Records journaled without log-probabilities would be missing from the store, and a run begun with them would
    mix captured and plain rows: either switch is refused (exit 2, nothing rewritten)."""
    _, server = forced
    plain, captured = tmp_path / "plain", tmp_path / "captured"
    with_k = ("--teacher.logprobs", str(K))
    assert data_gen_main(si_args(server, plain, model_dirs["teacher"], "--target", "2")) == 0
    assert data_gen_main(si_args(server, captured, model_dirs["teacher"], "--target", "2", *with_k)) == 0
    capsys.readouterr()
    for out, switched in ((plain, with_k), (captured, ())):
        rows = read_rows(out)
        assert data_gen_main(si_args(server, out, model_dirs["teacher"], "--target", "4", *switched)) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(errors) == 1 and "teacher.logprobs" in errors[0] and read_rows(out) == rows, errors


def test_output_spans_of_input_first_answers():
    text = "Sure.\nExample 1\nInput: <none>\nOutput:  a b \nExample 2:\nInput: x\nOutput:\tc\n\nExample 3\nInput: y"
    found = input_first_instances(text)
    assert [(i, o) for i, o, _ in found] == [("", "a b"), ("x", "c")]
    assert [text[slice(*where)] for _, _, where in found] == ["a b", "c"]


def test_an_output_ends_where_another_field_begins():
    """A second 'Output:' (as SmolLM2 wrote) or an 'Input:' without an 'Example N' head starts another answer: the
    first output is kept, and its span still points at it."""
    text = "Example 1\nInput: win cash\nOutput: spam\n Output: not spam\nExample 2\nInput: hi\nOutput: ham\nInput: x"
    found = input_first_instances(text)
    assert [(i, o) for i, o, _ in found] == [("win cash", "spam"), ("hi", "ham")]
    assert [text[slice(*where)] for _, _, where in found] == ["spam", "ham"]
    multi = "Example 1\nInput: a\nOutput: line one\nline two: more\nExample 2\nInput: b\nOutput: c"
    assert [o for _, o, _ in input_first_instances(multi)] == ["line one\nline two: more", "c"]  # not a field


def test_instances_found_in_a_real_tokenization(smollm2_tokenizer):
    """On SmolLM2's tokenizer: the kept instances of an answer (a duplicate and an empty output dropped) are matched
    to their own places in it; an output glued to 'Output:' (':"' is one token) is not delimited, the others are."""
    from data_gen.calls import Request, Result
    from data_gen.self_instruct import capture_instances
    from data_gen.self_instruct_text import parse_instances, postprocess_instances

    tok = smollm2_tokenizer
    text = (
        "Example 1\nInput: red\nOutput: warm\nExample 2\nInput: red\nOutput: warm\nExample 3\nInput: sky\nOutput:\n"
        'Example 4\nInput: sea\nOutput:"blue"\nExample 5\nInput: snow\nOutput: 🙂 cold ✓'
    )
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    answer = Result(Request("r", []), text, "stop", token_ids=ids, logprobs_key="key")
    pairs = postprocess_instances("Name a colour's feeling.", parse_instances(text, "stop", False), 5)
    assert [p["output"] for p in pairs] == ["warm", '"blue"', "🙂 cold ✓"]
    captured = capture_instances(tok, answer, pairs, is_classification=False)
    assert [c.get("uncaptured") for c in captured] == [None, "not_delimited", None]
    for inst in (captured[0], captured[2]):
        a, b = inst["token_span"]
        assert inst["token_ids"] == ids[a:b] and tok.decode(ids[a:b]).strip() == inst["output"]
    # The first 'warm', not the duplicate's: its tokens end before the second example.
    assert len(tok.decode(ids[: captured[0]["token_span"][1]])) < text.index("Example 2")
    assert ids[captured[2]["token_span"][1]] == ids[-1]  # the last output ends before the end of turn, without it
    assert capture_instances(tok, answer, pairs, is_classification=True)[0]["uncaptured"] == "output_first"
