"""``teacher.logprobs`` without a vLLM: answers' log-probabilities parsed, packed and cached; a server that cannot
return them refused before the first paid call; the captured store written from the cache and checked by
``distill train``'s data layer, which trains on a record's ``completion_token_ids``. The capture from a real vLLM is
tests/data_gen/test_logprobs_vllm.py."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from data_gen.cache import AnswerCache
from data_gen.config import TeacherConfig
from data_gen.logprobs import TokenLogprobs, mark_vocabulary, parse_content, write_store
from data_gen.testing import ErrorReply, ScriptedServer
from kd_core.config import ConfigError
from kd_core.remote import FatalError
from kd_core.topk_store import vocab_hash
from kd_recipes.cli import data_gen_main


def entry(token: int, top: list[tuple[int, float]], as_text: bool = False) -> dict:
    """One ``logprobs.content`` entry shaped as vLLM 0.32 writes it with return_tokens_as_token_ids."""
    name = (lambda i: f"t{i}") if as_text else (lambda i: f"token_id:{i}")
    logprob = dict(top).get(token, -9.0)
    return {
        "token": name(token),
        "logprob": logprob,
        "top_logprobs": [{"token": name(i), "logprob": lp} for i, lp in top],
    }


CONTENT = [
    entry(5, [(5, -0.3), (7, -2.5), (9, -3.0)]),
    entry(11, [(11, -1.2), (4, -0.5), (6, -4.0)]),  # the sampled token first, as vLLM lists it
]


def test_parse_pack_and_tail():
    lp = parse_content(CONTENT, 3)
    assert lp.token_ids.tolist() == [5, 11]
    assert lp.ids.tolist() == [[5, 7, 9], [11, 4, 6]]
    np.testing.assert_allclose(lp.logprobs, [[-0.3, -2.5, -3.0], [-1.2, -0.5, -4.0]], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lp.log_tail), 1 - np.exp(lp.logprobs.astype(np.float64)).sum(1), rtol=1e-5)
    data = lp.to_bytes()
    assert len(data) == 8 + 2 * (4 + 8 * 3)  # 4 + 8 K bytes per token
    back = TokenLogprobs.from_bytes(data)
    for name in ("token_ids", "ids", "logprobs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(lp, name))
    with pytest.raises(FatalError, match="returned 3 log-probabilities for a generated token, 4 were asked"):
        parse_content(CONTENT, 4)
    with pytest.raises(FatalError, match="as text, not as an id"):
        parse_content([entry(5, [(5, -0.1)], as_text=True)], 1)
    with pytest.raises(FatalError, match="without log-probabilities"):
        parse_content(None, 1)


def test_cache_keeps_logprobs_and_upgrades_an_old_cache(tmp_path):
    path = tmp_path / "cache.sqlite"
    old = sqlite3.connect(path)  # the schema of a cache written before teacher.logprobs
    old.execute(
        "CREATE TABLE answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, finish_reason TEXT,"
        " input_tokens INTEGER, output_tokens INTEGER, created REAL)"
    )
    old.execute("INSERT INTO answers VALUES ('old', 'paid before', 'stop', 3, 2, 0.0)")
    old.commit()
    old.close()
    cache = AnswerCache(path)
    assert cache.get("old").text == "paid before" and cache.get("old").logprobs is None
    packed = parse_content(CONTENT, 3).to_bytes()
    cache.put("new", "with log-probs", "stop", 3, 2, packed)
    cache.close()
    again = AnswerCache(path)  # reopened: the column is there, the bytes are the ones written
    assert again.get("new").logprobs == packed and len(again) == 2
    again.close()


def cot_args(server: ScriptedServer, tmp_path, tokenizer_dir, *extra: str) -> list[str]:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is 3 + 4?", "answer": "#### 7"}) + "\n")
    return [
        "cot",
        "--input_file",
        str(questions),
        "--k",
        "2",
        "--teacher.model",
        "scripted",
        "--teacher.base_url",
        server.base_url,
        "--teacher.api_key_env",
        "null",
        "--teacher.logprobs",
        "3",
        "--teacher.tokenizer",
        str(tokenizer_dir),
        "--output.dir",
        str(tmp_path / "out"),
        "--output.progress",
        "false",
        *extra,
    ]


def no_logprobs(body: dict) -> str | ErrorReply:
    """What ``transformers serve`` 5.24 answers a chat completion that asks for log-probabilities: HTTP 422."""
    if body.get("logprobs"):
        return ErrorReply(422, "logprobs is not supported")
    return "3 + 4 = 7. So the answer is 7."


def fewer(body: dict) -> dict:
    """An answer with 2 log-probabilities per token where 3 were asked."""
    return {
        "choices": [
            {
                "message": {"role": "assistant", "content": "7"},
                "finish_reason": "stop",
                "logprobs": {"content": [entry(5, [(5, -0.1), (7, -2.5)])]},
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1},
    }


@pytest.mark.parametrize(
    ("responder", "extra", "expected"),
    [
        (
            no_logprobs,
            (),
            "teacher.logprobs: the server at http://127.0.0.1:.* cannot return log-probabilities "
            r"\(teacher refused the request \(HTTP 422\): .*logprobs is not supported.*such as vLLM",
        ),
        (
            fewer,
            ("--teacher.stream", "false"),
            "teacher.logprobs: the server returned 2 log-probabilities for a generated token, 3 were asked",
        ),
    ],
    ids=["422", "fewer-than-k"],
)
def test_refused_before_the_first_paid_call(responder, extra, expected, model_dirs, tmp_path, capsys):
    server = ScriptedServer(responder).start()
    try:
        assert data_gen_main(cot_args(server, tmp_path, model_dirs["teacher"], *extra)) == 2
        assert server.total == 1  # the one-token probe; no question was asked
    finally:
        server.stop()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    import re

    assert re.search(expected, errors[0]), errors[0]
    assert not (tmp_path / "out" / "cache.sqlite").exists() and not (tmp_path / "out" / "journal.jsonl").exists()


def captured_rows(tokenizer, cache: AnswerCache) -> list[dict]:
    """Two records as data-gen writes them, their answers' log-probabilities in ``cache``."""
    rows = []
    for n, (prompt, answer) in enumerate((("What is 12 plus 7?", "The answer is 19."), ("List colors.", "red, blue"))):
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        top = [[(t, -0.2)] + [(o, -3.0 - n) for o in range(250, 253) if o != t][:2] for t in ids]
        lp = parse_content([entry(t, top_t) for t, top_t in zip(ids, top)], 3)
        cache.put(f"key{n}", answer, "stop", 5, len(ids), lp.to_bytes())
        rows.append(
            {
                "id": f"r{n}",
                "prompt": prompt,
                "completion": answer,
                "completion_token_ids": ids,
                "provenance": {"logprobs_key": f"key{n}"},
            }
        )
    mark_vocabulary(rows, tokenizer)
    return rows


def test_training_data_uses_the_generated_ids(tokenizer):
    from distill.data.datasets import DataSettings, tokenize_records

    vocab = vocab_hash(tokenizer)
    ids = tokenizer("The answer is 19.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    odd = ids[::-1]  # not the text's tokens: only the ids can put them in the labels
    record = {"prompt": "What is 12 plus 7?", "completion": "The answer is 19.", "completion_token_ids": odd}
    settings = DataSettings()

    def counted(rec: dict) -> list[int]:
        labels = tokenize_records([rec], tokenizer, settings, "mem.jsonl").examples[0]["labels"]
        return [label for label in labels[1:] if label != -100]

    assert counted({**record, "completion_vocab_sha256": vocab}) == odd
    # Another vocabulary's ids (a student with another tokenizer): the text is tokenized as usual.
    plain = {"prompt": record["prompt"], "completion": record["completion"]}
    assert counted({**record, "completion_vocab_sha256": "0" * 64}) == counted(plain) != odd
    with pytest.raises(ConfigError, match=r"mem.jsonl: row 0: field 'completion_token_ids': expected a non-empty list"):
        counted({**record, "completion_token_ids": [10**6], "completion_vocab_sha256": vocab})


def test_captured_store_lines_up_and_refuses_a_cut_record(tokenizer, tmp_path):
    from distill.data.datasets import DataSettings, tokenize_records
    from distill.offline.store import LogitStore
    from kd_core.records import iter_json_objects

    cache = AnswerCache(tmp_path / "cache.sqlite")
    rows = captured_rows(tokenizer, cache)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TeacherConfig(model="served", base_url="http://u:secret@127.0.0.1:1/v1", logprobs=3, tokenizer="tok")
    directory = write_store(tmp_path, rows, cache, cfg, tokenizer, [data])
    assert "secret" not in (directory / "store.json").read_text()
    store = LogitStore(directory)
    records = [record for _, _, record in iter_json_objects(data)]
    examples = tokenize_records(records, tokenizer, DataSettings(), str(data))
    store.check_compatible(tokenizer, len(tokenizer), 1.0, str(data), examples)
    for example in examples.examples:  # row t of a sample: the distribution its t-th completion token came from
        ids, logp, _ = store.sample(example["sample_id"])
        counted = [label for label in example["labels"][1:] if label != -100]
        assert len(ids) == len(counted)
        for row, token in enumerate(counted):
            assert token in ids[row] and abs(logp[row][list(ids[row]).index(token)] + 0.2) < 0.04  # 8-bit values
    first = examples.examples[0]["input_ids"]
    cut = tokenize_records(records[:1], tokenizer, DataSettings(max_length=len(first) - 2), str(data))
    with pytest.raises(ConfigError, match="training sample 0 of .* does not count exactly its completion_token_ids"):
        store.check_compatible(tokenizer, len(tokenizer), 1.0, str(data), cut)
    cache.close()


def test_config_refusals(capsys):
    base = ["--teacher.model", "m", "--output.dir", "unused", "--teacher.api_key_env", "null"]
    for extra, expected in (
        (["cot", "--input_file", "q.jsonl", "--teacher.logprobs", "3"], "tokenizer: teacher.logprobs needs"),
        (["cot", "--input_file", "q.jsonl", "--teacher.logprobs", "0", "--teacher.tokenizer", "t"], "expected K >= 1"),
        (
            ["cot", "--input_file", "q.jsonl", "--teacher.logprobs", "3", "--teacher.tokenizer", "t"]
            + ["--teacher.backend", "local"],
            "captured from a served teacher",
        ),
    ):
        assert data_gen_main(extra + base) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(errors) == 1 and expected in errors[0], errors


def test_capture_cannot_be_switched_on_in_a_run_made_without(model_dirs, tmp_path, capsys):
    """Records journaled without log-probabilities would be missing from the store: such a directory is refused."""
    server = ScriptedServer(no_logprobs).start()
    try:
        plain = cot_args(server, tmp_path, model_dirs["teacher"])
        cut = plain.index("--teacher.logprobs")
        assert data_gen_main(plain[:cut] + plain[cut + 4 :]) == 0
        calls = server.total
        capsys.readouterr()
        assert data_gen_main(plain) == 2 and server.total == calls
    finally:
        server.stop()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and "teacher.logprobs" in errors[0], errors
