"""``data-gen cot`` against a scripted OpenAI-compatible teacher on loopback: verification against gold answers, STaR
rationalization (the hint never reaches the saved records), self-consistency voting, resume, bad input, and a GSM8K
slice; plus the answer extractors one by one."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from data_gen.cot import CotConfig
from data_gen.testing import ErrorReply, ScriptedServer
from kd_core.answers import AnswerExtractor, gold_answer, majority, normalize_number
from kd_core.config import ConfigError, parse_command_line
from kd_recipes.cli import data_gen_main
from tests.conftest import REPO_ROOT

# question -> per-sample answers (by the seed the pipeline sends = sample index); "HINT" marks the hinted answer.
TABLE = {
    "Ann has 3 cats and gets 4 more. How many cats?": [
        "3 + 4 = 7. So the answer is 7.",
        "3 + 4 = 8. So the answer is 8.",
        "She has 7 cats. So the answer is 7.",
        "Cats are nice.",
    ],
    "Bo has 10 pens and loses 6. How many pens?": [
        "10 - 6 = 5. So the answer is 5.",
        "10 - 6 = 3. So the answer is 3.",
        "So the answer is 16.",
        "So the answer is 5.",
    ],
    "Cy has 2 bags of 5 plums. How many plums?": [
        "2 * 5 = 10. So the answer is $10.00.",
        "2 * 5 = 10. So the answer is 10.",
        "2 + 5 = 7. So the answer is 7.",
        "So the answer is 10.",
    ],
}
HINTED = {
    "Bo has 10 pens and loses 6. How many pens?": "Bo keeps 10 - 6 = 4 pens. So the answer is 4.",
}


def question_of(content: str) -> str:
    return re.findall(r"Question: (.*?)\n", content)[-1]


def responder(body: dict) -> str:
    content = body["messages"][-1]["content"]
    question = question_of(content)
    if "(The correct answer is" in content:
        return HINTED.get(question, "I was told the hint, so the answer is 0.")
    return TABLE[question][body["seed"] % 4]


@pytest.fixture
def server():
    srv = ScriptedServer(responder).start()
    yield srv
    srv.stop()


def write_questions(path: Path, golds: dict[str, str | None]) -> Path:
    lines = [
        json.dumps({"question": q, "answer": gold} if gold is not None else {"question": q})
        for q, gold in golds.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


GOLDS = {
    "Ann has 3 cats and gets 4 more. How many cats?": "3 + 4 = 7\n#### 7",
    "Bo has 10 pens and loses 6. How many pens?": "#### 4",
    "Cy has 2 bags of 5 plums. How many plums?": "#### 10",
}


def args(server: ScriptedServer, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "cot",
        "--input_file",
        str(inp),
        "--teacher.model",
        "scripted",
        "--teacher.base_url",
        server.base_url,
        "--teacher.api_key_env",
        "null",
        "--output.dir",
        str(out),
        "--output.progress",
        "false",
        *extra,
    ]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def test_verification_and_rationalization(server, tmp_path):
    inp = write_questions(tmp_path / "q.jsonl", GOLDS)
    out = tmp_path / "cot"
    assert data_gen_main(args(server, inp, out, "--keep_per_question", "2")) == 0
    data = rows(out)
    by_q: dict[str, list[dict]] = {}
    for r in data:
        by_q.setdefault(r["question"], []).append(r)
    ann_q = "Ann has 3 cats and gets 4 more. How many cats?"
    ann = by_q[ann_q]
    assert [r["rationale"] for r in ann] == [TABLE[ann_q][0], TABLE[ann_q][2]]
    assert all(r["correct"] and r["answer"] == "7" and not r["rationalized"] for r in ann)
    assert [r["attempts"] for r in ann] == [1, 3]
    # "$10.00" normalises to the gold 10, and duplicates of the same text are not kept twice.
    cy = by_q["Cy has 2 bags of 5 plums. How many plums?"]
    assert [r["answer"] for r in cy] == ["10", "10"] and cy[0]["rationale"].endswith("$10.00.")
    # No sample for Bo was right: the hinted retry was, and is saved as a rationalized record without the hint.
    (bo,) = by_q["Bo has 10 pens and loses 6. How many pens?"]
    assert bo["rationalized"] and bo["attempts"] == 5 and bo["answer"] == bo["gold"] == "4" and bo["correct"]
    for r in data:
        saved = json.dumps(r)
        assert "correct answer is" not in saved and "Question:" not in saved  # no hint, no few-shot prompt
        assert r["prompt"] == r["question"] and r["completion"] == r["rationale"]
        assert r["messages"] == [
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r["rationale"]},
        ]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["solved"] == 3 and stats["rationalized"] == 1
    # Ann: one wrong (8), one without an answer; Bo: 3, 16 wrong twice... counted, never silently lost.
    assert stats["rejections"]["no_answer"] == 1
    assert stats["rejections"]["wrong_answer"] == 1 + 4 + 1
    assert stats["rejections"]["surplus"] == 1  # Cy's fourth correct sample, beyond keep_per_question=2
    # The trainer reads it directly.
    from distill.data.datasets import detect_shape

    assert detect_shape(data[0], "auto", "x") == "messages"


def test_failed_rationalization_is_counted_and_hint_words_rejected(tmp_path):
    def stubborn(body: dict) -> str:
        content = body["messages"][-1]["content"]
        if "(The correct answer is" in content:
            return "Using the hint, 10 - 6 = 4. So the answer is 4."
        return "So the answer is 9."

    srv = ScriptedServer(stubborn).start()
    try:
        inp = write_questions(tmp_path / "q.jsonl", {"Bo has 10 pens and loses 6. How many pens?": "#### 4"})
        out = tmp_path / "cot"
        assert data_gen_main(args(srv, inp, out, "--k", "2", "--rationalization_attempts", "2")) == 0
        stats = json.loads((out / "stats.json").read_text())
        assert stats["rows"] == 0
        assert stats["rejections"] == {"wrong_answer": 2, "rationalized_mentions_hint": 2, "unsolved": 1}
        # A rerun journaled the question: nothing is asked again.
        calls = srv.total
        assert data_gen_main(args(srv, inp, out, "--k", "2", "--rationalization_attempts", "2")) == 0
        assert srv.total == calls
    finally:
        srv.stop()


def test_self_consistency_vote_without_gold(server, tmp_path):
    inp = write_questions(tmp_path / "q.jsonl", {q: None for q in GOLDS})
    out = tmp_path / "vote"
    assert (
        data_gen_main(args(server, inp, out, "--mode", "vote", "--answer_field", "null", "--keep_per_question", "4"))
        == 0
    )
    data = rows(out)
    labels = {r["question"]: r["label"] for r in data}
    # Ann: 7 twice, 8 once -> 7. Bo: 5, 3, 16, 5 -> 5 (the vote picks the majority, right or wrong). Cy: 10 x3.
    assert labels == {
        "Ann has 3 cats and gets 4 more. How many cats?": "7",
        "Bo has 10 pens and loses 6. How many pens?": "5",
        "Cy has 2 bags of 5 plums. How many plums?": "10",
    }
    assert all(r["answer"] == r["label"] and r["gold"] is None and r["correct"] is None for r in data)
    assert len([r for r in data if r["question"].startswith("Cy")]) == 3  # three distinct texts agree on 10
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rejections"]["minority"] == 1 + 2 + 1 and stats["rejections"]["no_answer"] == 1
    # A stricter share leaves Bo without a majority (2 of 4 < 0.75): counted, not kept.
    out2 = tmp_path / "vote2"
    assert (
        data_gen_main(args(server, inp, out2, "--mode", "vote", "--answer_field", "null", "--min_vote_share", "0.75"))
        == 0
    )
    stats = json.loads((out2 / "stats.json").read_text())
    assert stats["rejections"]["no_majority"] == 2 and stats["solved"] == 1


def test_bad_input_exits_2_before_writing(server, tmp_path, capsys):
    missing = write_questions(
        tmp_path / "q.jsonl",
        {
            "Ann has 3 cats and gets 4 more. How many cats?": "#### 7",
            "Bo has 10 pens and loses 6. How many pens?": None,
        },
    )
    out = tmp_path / "cot"
    assert data_gen_main(args(server, missing, out)) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "missing gold answer" in err
    assert not out.exists()
    assert data_gen_main(args(server, missing, out, "--extractor.kind", "regex", "--extractor.regex", "(a")) == 2
    assert "does not compile" in capsys.readouterr().err
    no_number = write_questions(tmp_path / "n.jsonl", {"What colour is the sky?": "blue"})
    assert data_gen_main(args(server, no_number, out)) == 2
    assert "no gold answer" in capsys.readouterr().err
    assert not out.exists() and server.total == 0


def test_resume_replays_from_cache(server, tmp_path):
    inp = write_questions(tmp_path / "q.jsonl", GOLDS)
    out = tmp_path / "cot"
    assert data_gen_main(args(server, inp, out, "--max_questions", "1")) == 0
    first = server.total
    assert data_gen_main(args(server, inp, out, "--chunk_size", "1")) == 0
    assert len(rows(out)) == 3 and len((out / "journal.jsonl").read_text().splitlines()) == 3
    assert server.total == first + 4 + 4 + 1  # only the two new questions (and Bo's hinted retry) were asked
    (out / "journal.jsonl").unlink()  # the cache alone reproduces every answer at no cost
    assert data_gen_main(args(server, inp, out)) == 0
    assert server.total == first + 9 and len(rows(out)) == 3


def test_gsm8k_slice(server, shared_data, tmp_path):
    source = [json.loads(line) for line in (shared_data / "gsm8k_test.jsonl").read_text().splitlines()[:6]]

    def gsm_teacher(body: dict) -> str:
        # Answers from GSM8K's own worked solution: correct for even seeds, off by one for odd ones.
        question = question_of(body["messages"][-1]["content"])
        record = next(r for r in source if r["question"].split("\n")[0] == question.split("\n")[0])
        work, _, number = record["answer"].rpartition("####")
        value = normalize_number(number)
        if body["seed"] % 2:
            value = str(int(value) + 1)
        return re.sub(r"<<.*?>>", "", work).strip() + f" So the answer is {value}."

    srv = ScriptedServer(gsm_teacher).start()
    try:
        out = tmp_path / "gsm"
        inp = shared_data / "gsm8k_test.jsonl"
        assert data_gen_main(args(srv, inp, out, "--max_questions", "6", "--k", "2")) == 0
        data = rows(out)
        assert len(data) == 6 and all(r["correct"] and not r["rationalized"] for r in data)
        assert [r["gold"] for r in data] == [normalize_number(r["answer"].rpartition("####")[2]) for r in source]
        assert json.loads((out / "stats.json").read_text())["rejections"] == {"wrong_answer": 6}
    finally:
        srv.stop()


def test_shipped_config_parses():
    cfg = parse_command_line(
        CotConfig, ["--config", str(REPO_ROOT / "configs/data_gen/cot_gsm8k.yaml")], "data-gen cot"
    )
    assert cfg.mode == "gold" and cfg.extractor.kind == "answer_is"


@pytest.mark.parametrize(
    "kind,text,expected",
    [
        ("answer_is", "3 + 4 = 7 apples. So the answer is 7 apples.", "7"),
        ("answer_is", "The answer is: $1,250.", "1250"),
        ("answer_is", "no conclusion here 12", None),
        ("hash", "Work 2 + 2 = 4\n#### 4", "4"),
        ("hash", "#### -3.50", "-3.5"),
        ("final_number", "First 3, then 4.5 and finally 9.", "9"),
        ("final_number", "nothing", None),
    ],
)
def test_extractors(kind, text, expected):
    assert AnswerExtractor(kind).extract(text) == expected


def test_regex_extractor_and_text_mode():
    named = AnswerExtractor("regex", r"Result\s*=\s*(?P<answer>\S+)")
    assert named.extract("Result = 3\nResult = 1,000") == "1000"
    text = AnswerExtractor("regex", r"Label: (\w+)", numeric=False)
    assert text.extract("Label: Positive.") == "positive"
    with pytest.raises(ValueError, match="does not compile"):
        AnswerExtractor("regex", "(unclosed")
    with pytest.raises(ConfigError, match="extractor: regex: .* does not compile"):
        parse_command_line(
            CotConfig,
            [
                "--input_file",
                "x",
                "--output.dir",
                "o",
                "--teacher.model",
                "m",
                "--extractor.kind",
                "regex",
                "--extractor.regex",
                "[z-a]",
            ],
            "data-gen cot",
        )
    cfg = parse_command_line(
        CotConfig,
        ["--input_file", "x", "--output.dir", "o", "--teacher.model", "m", "--extractor.kind", "hash"],
        "data-gen cot",
    )
    assert isinstance(cfg.extractor, AnswerExtractor) and cfg.extractor.extract("#### 5") == "5"


def test_normalisation_and_vote():
    assert [normalize_number(t) for t in ("18.00", "$72", "1,000", "3/4", "-0.0", "x")] == [
        "18",
        "72",
        "1000",
        "0.75",
        "0",
        None,
    ]
    # a sampled run of digits longer than Decimal's 28-digit context is kept exactly, not an error
    assert normalize_number("7" * 40) == "7" * 40 and normalize_number("100") == "100"
    assert gold_answer("He pays 3 * 4 = 12\n#### 12") == "12" and gold_answer("42") == "42"
    assert majority(["2", None, "3", "3", "2"]) == ("2", 2)  # tie: first seen wins
    assert majority([None, None]) == (None, 0)


# ----------------------------------------------------------------------------------------------------------------
# Secrets: credentials in base_url, a key echoed back by the server, a key pasted where its variable's name belongs
# ----------------------------------------------------------------------------------------------------------------

URL_SECRET = "pr0xy-S3cret-pass"
API_KEY = "sk-test-Echoed-Key-0123456789"


def with_credentials(server: ScriptedServer, password: str = URL_SECRET) -> str:
    return server.base_url.replace("http://", f"http://proxyuser:{password}@")


def basic_token(password: str = URL_SECRET) -> str:
    return base64.b64encode(f"proxyuser:{password}".encode()).decode()


def files_holding(out: Path, *secrets: str) -> list[str]:
    """Every file under ``out`` (cache, journal, data, card, config) that holds one of ``secrets``."""
    return [
        f"{p.name}: {s}" for p in sorted(out.rglob("*")) if p.is_file() for s in secrets if s.encode() in p.read_bytes()
    ]


def test_credentials_in_base_url_authenticate_but_are_never_saved_or_printed(server, tmp_path, capfd):
    inp = write_questions(tmp_path / "q.jsonl", GOLDS)
    out = tmp_path / "cot"
    url = with_credentials(server)
    assert data_gen_main(args(server, inp, out, "--teacher.base_url", url)) == 0
    # The live client used the real URL: the server saw the URL's credentials (httpx sends them as Basic auth).
    assert set(server.authorizations) == {f"Basic {basic_token()}"} and len(rows(out)) == 3
    printed = capfd.readouterr()
    assert URL_SECRET not in printed.out + printed.err and basic_token() not in printed.out + printed.err
    assert files_holding(out, URL_SECRET, basic_token()) == []
    masked = url.replace(URL_SECRET, "***")
    assert {r["provenance"]["base_url"] for r in rows(out)} == {masked}
    assert masked in (out / "config.yaml").read_text() and masked in (out / "README.md").read_text()
    # The cache is keyed without the URL: the same server behind a rotated password still hits it.
    calls = server.total
    (out / "journal.jsonl").unlink()
    rotated = with_credentials(server, "r0tated-Pass-456")
    assert data_gen_main(args(server, inp, out, "--teacher.base_url", rotated)) == 0
    assert server.total == calls and len(rows(out)) == 3
    assert files_holding(out, URL_SECRET, "r0tated-Pass-456") == []


@pytest.mark.parametrize("status", [401, 429, 500])
def test_a_key_echoed_in_an_error_body_is_scrubbed(status, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    url_holder: list[str] = []

    def refuse(body: dict) -> ErrorReply:
        # What a careless server or proxy sends back: the key, the Basic credentials and the URL it was called at.
        return ErrorReply(status, f"invalid api key {API_KEY} (auth Basic {basic_token()}) at {url_holder[0]}")

    srv = ScriptedServer(refuse).start()
    try:
        url_holder.append(with_credentials(srv))
        inp = write_questions(tmp_path / "q.jsonl", GOLDS)
        out = tmp_path / "cot"
        code = data_gen_main(
            args(
                srv,
                inp,
                out,
                "--teacher.base_url",
                url_holder[0],
                "--teacher.api_key_env",
                "DISTILL_TEST_KEY",
                "--teacher.max_retries",
                "1",
                "--teacher.backoff_base_s",
                "0.01",
            )
        )
    finally:
        srv.stop()
    printed = capfd.readouterr()
    assert code == 2 and srv.total >= 1
    error = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert len(error) == 1, printed.err
    assert f"proxyuser:***@127.0.0.1:{srv.port}/v1" in error[0]
    if status != 500:  # a 5xx is reported by its status alone; 4xx and 429 quote the server's message
        assert "invalid api key *** (auth Basic ***)" in error[0]
    for secret in (API_KEY, URL_SECRET, basic_token()):
        assert secret not in printed.out + printed.err
    assert files_holding(out, API_KEY, URL_SECRET, basic_token()) == []


@pytest.mark.parametrize("value", ["sk-proj-Abc123Def456Ghi789", "hf_AbCdEfGhIjKlMnOpQrStUvWx", "my secret key"])
def test_a_key_given_as_api_key_env_is_refused_without_echoing_it(value, server, tmp_path, capfd):
    inp = write_questions(tmp_path / "q.jsonl", GOLDS)
    out = tmp_path / "cot"
    assert data_gen_main(args(server, inp, out, "--teacher.api_key_env", value)) == 2
    printed = capfd.readouterr()
    assert printed.err.count("\n") == 1 and "api_key_env: expected the NAME of an environment variable" in printed.err
    assert value not in printed.out + printed.err and value[:8] not in printed.err
    config = tmp_path / "c.yaml"
    config.write_text(f"teacher:\n  api_key_env: {value}\n")
    assert (
        data_gen_main(
            [
                "cot",
                "--config",
                str(config),
                "--input_file",
                str(inp),
                "--teacher.model",
                "scripted",
                "--teacher.base_url",
                server.base_url,
                "--output.dir",
                str(out),
            ]
        )
        == 2
    )
    printed = capfd.readouterr()
    assert printed.err.count("\n") == 1 and value not in printed.out + printed.err
    assert not out.exists() and server.total == 0
