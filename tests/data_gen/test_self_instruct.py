"""``data-gen self-instruct`` end to end against a scripted OpenAI-compatible server on loopback: outputs, resume
after ``kill -9`` at several points, SIGTERM, budget, bad inputs; and the parsing/filtering rules one by one."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_gen.engine import ParseError
from data_gen.self_instruct import (
    FilterConfig,
    filter_reason,
    load_seed_tasks,
    parse_instances,
    parse_instructions,
    parse_yes_no,
    postprocess_instances,
)
from data_gen.testing import ScriptedServer
from kd_core.config import ConfigError
from kd_recipes.cli import data_gen_main
from tests.conftest import REPO_ROOT

WORDS = [
    f"{a}{b}"
    for a in ("ka", "lo", "mi", "su", "te", "ra", "po", "ne")
    for b in ("x", "d", "ft", "rn", "lm", "q", "vy", "zz", "gh", "pt")
]


def responder(body: dict) -> str:
    """Deterministic teacher: the same prompt always gets the same answer (so runs can be compared exactly)."""
    content = body["messages"][-1]["content"]
    rng = random.Random(hashlib.sha256(content.encode()).hexdigest())
    if content.startswith("We are collecting"):
        tasks = ["Describe " + " ".join(rng.sample(WORDS, 9)) + "." for _ in range(5)]
        tasks += [
            "Draw a picture of " + rng.choice(WORDS) + " on a map.",  # blacklist
            "Summarize the paragraph in one sentence.",
        ]  # copy of a seed: ROUGE-L 1.0
        return "Sure, here they are.\n" + "\n".join(f"Task {9 + i}: {t}" for i, t in enumerate(tasks))
    if content.endswith("Classification:"):
        return rng.choice([" Yes", "No."])
    if "classification task. First" in content:
        return (
            "Class label: "
            + rng.choice(WORDS)
            + "\nInput: "
            + " ".join(rng.sample(WORDS, 4))
            + "\nClass label: other\nInput: "
            + " ".join(rng.sample(WORDS, 4))
        )
    return (
        "Example 1\nInput: <none>\nOutput: "
        + " ".join(rng.sample(WORDS, 6))
        + "\nExample 2\nInput: "
        + " ".join(rng.sample(WORDS, 3))
        + "\nOutput: "
        + " ".join(rng.sample(WORDS, 5))
    )


@pytest.fixture
def server():
    srv = ScriptedServer(responder).start()
    yield srv
    srv.stop()


def args(server: ScriptedServer, out: Path, *extra: str) -> list[str]:
    return [
        "self-instruct",
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
        "--prompts_per_round",
        "4",
        *extra,
    ]


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def test_generates_a_dataset_the_trainer_can_read(server, tmp_path, capsys):
    out = tmp_path / "si"
    assert data_gen_main(args(server, out, "--target", "12")) == 0
    rows = read_rows(out)
    instructions = {r["instruction"] for r in rows}
    assert len(instructions) == 12 and len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["messages"][0]["role"] == "user" and row["messages"][1] == {
            "role": "assistant",
            "content": row["output"],
        }
        assert row["instruction"] in row["messages"][0]["content"] and row["output"]
        assert row["provenance"]["teacher"] == "scripted" and len(row["provenance"]["prompt_template_sha256"]) == 16
        assert "picture" not in row["instruction"] and row["instruction"] != "Summarize the paragraph in one sentence."
    assert {r["is_classification"] for r in rows} == {True, False}
    printed = capsys.readouterr().out
    assert "estimate:" in printed and "'blacklist':" in printed and "'rouge_similar':" in printed

    import datasets

    loaded = datasets.load_dataset(str(out))["train"]
    assert loaded.num_rows == len(rows) and loaded[0]["messages"] == rows[0]["messages"]
    from distill.data.datasets import detect_shape
    from kd_core.records import load_records

    for name in ("data.jsonl", "data.parquet"):  # what the distill trainer's data.train_file reads
        records = load_records(out / name)
        assert len(records) == len(rows) and detect_shape(records[0], "auto", name) == "messages"
    card = (out / "README.md").read_text()
    assert "data_files" in card and "records: 12" in card
    assert "api_key_env: null" in (out / "config.yaml").read_text()

    # A rerun (or a larger target) reuses every paid answer: no request for the first 12 again.
    before = server.total
    assert data_gen_main(args(server, out, "--target", "12")) == 0
    assert server.total == before and read_rows(out) == rows
    # Same seed in a new directory: the same dataset (runs are reproducible).
    assert data_gen_main(args(server, tmp_path / "again", "--target", "12")) == 0
    assert [r["instruction"] for r in read_rows(tmp_path / "again")] == [r["instruction"] for r in rows]


def test_kill_9_at_several_points_then_resume(server, tmp_path):
    """Kill the generator with SIGKILL three times mid-run; the final data equals an uninterrupted run's."""
    target = "30"
    assert data_gen_main(args(server, tmp_path / "reference", "--target", target)) == 0
    reference = read_rows(tmp_path / "reference")
    server.counts.clear()
    server.latency_s = 0.03  # slow enough to land kills mid-run
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "data_gen", *args(server, out, "--target", target)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    kills = 0
    for threshold in (15, 45, 80):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300  # a guard against a hung run; a busy machine's start-up can take a minute
        while server.total < threshold and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    rows = read_rows(out)
    assert rows == [r for r in rows if r["id"] in {x["id"] for x in reference}]
    assert [(r["id"], r["instruction"], r["input"], r["output"]) for r in rows] == [
        (r["id"], r["instruction"], r["input"], r["output"]) for r in reference
    ]
    journal_ids = [json.loads(line)["id"] for line in (out / "journal.jsonl").read_text().splitlines()]
    assert len(journal_ids) == len(set(journal_ids))  # nothing duplicated
    # Only calls in flight at a kill can have been sent twice (at most concurrency=16 per kill).
    repeated = sum(n - 1 for n in server.counts.values() if n > 1)
    assert repeated <= 16 * kills
    before = server.total
    assert subprocess.run(command, env=env, capture_output=True, timeout=120).returncode == 0
    assert server.total == before  # a finished run asks nothing again


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_and_resumes(server, tmp_path, signum):
    server.latency_s = 0.05
    out = tmp_path / "term"
    command = [sys.executable, "-m", "data_gen", *args(server, out, "--target", "40")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # a guard against a hung run, far above a busy machine's start-up
    while server.total < 20 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    stdout, _ = proc.communicate(timeout=60)
    # Ctrl-C exits 130 as every command does; SIGTERM (a scheduler) 3; both after saving the calls in flight.
    reason, code = ("interrupted", 130) if signum == signal.SIGINT else ("terminated", 3)
    assert proc.returncode == code, stdout
    assert signal.Signals(signum).name in stdout and f"stopped early ({reason})" in stdout
    assert "teacher calls:" in stdout
    assert (out / "data.jsonl").exists() and (out / "README.md").exists()
    server.latency_s = 0.0
    assert subprocess.run(command, env=env, capture_output=True, timeout=120).returncode == 0
    assert len({r["instruction"] for r in read_rows(out)}) == 40


def test_budget_estimate_over_cap_exits_2_before_any_call(server, tmp_path, capsys):
    out = tmp_path / "b"
    code = data_gen_main(
        args(server, out, "--target", "100", "--teacher.price_output_per_m", "10", "--teacher.max_cost_usd", "0.01")
    )
    assert code == 2 and server.total == 0 and not out.exists()
    assert "teacher.max_cost_usd: the estimated cost" in capsys.readouterr().err


def test_budget_cap_during_the_run_stops_with_code_3(server, tmp_path, capsys):
    """The estimate fits the cap but the real spend would not: the run stops cleanly at the cap, exit 3."""
    priced = ["--target", "4", "--teacher.price_input_per_m", "100", "--teacher.decoding.max_tokens", "16"]
    assert data_gen_main(args(server, tmp_path / "free", *priced)) == 0
    printed = capsys.readouterr().out
    estimate = float(printed.split("estimate: at most $")[1].split(" ")[0])
    actual = float(printed.split("cost: $")[1].split(";")[0])
    assert estimate < actual  # ~20 candidates per round need classifying and instances; the estimate assumed 4
    cap = (estimate + actual) / 2
    out = tmp_path / "capped"
    code = data_gen_main(
        args(
            server,
            out,
            *priced,
            "--teacher.max_cost_usd",
            str(cap),
            "--teacher.cache_path",
            str(tmp_path / "capped_cache.sqlite"),
        )
    )
    printed = capsys.readouterr().out
    assert code == 3 and "stopped early (budget)" in printed
    assert float(printed.split("cost: $")[1].split(";")[0]) <= cap


def test_credentials_in_base_url_reach_the_server_and_no_file_or_line(server, tmp_path, capfd):
    secret = "Pr0xy-pass-4-selfinstruct"
    url = server.base_url.replace("http://", f"http://proxyuser:{secret}@")
    out = tmp_path / "si"
    assert data_gen_main(args(server, out, "--target", "4", "--teacher.base_url", url)) == 0
    basic = base64.b64encode(f"proxyuser:{secret}".encode()).decode()
    assert set(server.authorizations) == {f"Basic {basic}"}  # the client logged in with the URL's credentials
    printed = capfd.readouterr()
    assert secret not in printed.out + printed.err
    leaks = [
        p.name
        for p in out.rglob("*")
        if p.is_file() and (secret.encode() in p.read_bytes() or basic.encode() in p.read_bytes())
    ]
    assert leaks == []  # config.yaml, journal.jsonl (provenance), cache.sqlite, data files, README.md
    masked = url.replace(secret, "***")
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert {r["provenance"]["base_url"] for r in journal} == {masked}
    assert {r["provenance"]["base_url"] for r in read_rows(out)} == {masked}


def test_bad_inputs_exit_2_with_a_clear_message(server, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    code = data_gen_main(
        [
            "self-instruct",
            "--teacher.model",
            "m",
            "--teacher.api_key_env",
            "NO_SUCH_KEY_VAR",
            "--output.dir",
            str(tmp_path / "k"),
        ]
    )
    assert code == 2 and "NO_SUCH_KEY_VAR" in capsys.readouterr().err and not (tmp_path / "k").exists()

    seeds = tmp_path / "seeds.jsonl"
    good = {
        "id": "a",
        "name": "n",
        "instruction": "Do it.",
        "instances": [{"input": "", "output": "ok"}],
        "is_classification": False,
    }
    seeds.write_text(json.dumps(good) + "\n" + json.dumps({**good, "instances": [{"input": 3}]}) + "\n")
    code = data_gen_main(args(server, tmp_path / "s", "--seed_tasks", str(seeds)))
    assert code == 2 and f"{seeds}:2: field 'instances[0]'" in capsys.readouterr().err

    code = data_gen_main(
        args(
            server,
            tmp_path / "u",
            "--teacher.base_url",
            "http://127.0.0.1:9/v1",
            "--teacher.max_retries",
            "1",
            "--teacher.backoff_base_s",
            "0.01",
            "--target",
            "2",
        )
    )
    assert code == 2 and "failed request" in capsys.readouterr().err and server.total == 0


def test_the_target_reached_in_the_last_round_is_a_finished_run(server, tmp_path, capsys):
    assert data_gen_main(args(server, tmp_path / "one", "--target", "4", "--max_rounds", "1")) == 0
    assert "gave up" not in capsys.readouterr().out
    assert len({row["instruction"] for row in read_rows(tmp_path / "one")}) == 4


def test_a_teacher_that_never_lists_tasks_gives_up_after_max_rounds(tmp_path, capsys):
    server = ScriptedServer(lambda body: "I cannot help with that.").start()
    try:
        code = data_gen_main(args(server, tmp_path / "g", "--max_rounds", "2", "--teacher.max_parse_retries", "0"))
    finally:
        server.stop()
    assert code == 3 and server.total == 8  # 2 rounds x 4 prompts, nothing else
    assert "gave up after max_rounds=2" in capsys.readouterr().out


def test_real_seed_tasks(server, tmp_path, shared_data):
    out = tmp_path / "real"
    seeds = shared_data / "self_instruct_seed_tasks.jsonl"
    assert len(load_seed_tasks(seeds)) == 175
    assert data_gen_main(args(server, out, "--target", "8", "--seed_tasks", str(seeds))) == 0
    assert len({r["instruction"] for r in read_rows(out)}) == 8


def test_parsing_and_filters():
    text = "Here you go:\nTask 9: Write a limerick about tea.\nTask 10: Classify the tone of the email.\nTask 11: Cut"
    assert parse_instructions(text, "stop")[-1] == "Cut"
    assert parse_instructions(text, "length") == ["Write a limerick about tea.", "Classify the tone of the email."]
    with pytest.raises(ParseError):
        parse_instructions("no list here", "stop")
    assert parse_yes_no(" Yes, it is.", "stop") is True and parse_yes_no("no", "stop") is False
    with pytest.raises(ParseError):
        parse_yes_no("maybe", "stop")

    cls = parse_instances("Class label: spam\nInput: win money\nClass label: ham\nInput: see you", "stop", True)
    assert cls == [{"input": "win money", "output": "spam"}, {"input": "see you", "output": "ham"}]
    gen = parse_instances("Example 1\nInput: <none>\nOutput: a\nExample 2\nInput: b\nOutput: c", "stop", False)
    assert gen == [{"input": "", "output": "a"}, {"input": "b", "output": "c"}]
    assert (
        postprocess_instances(
            "Task",
            gen + [{"input": "b", "output": "c"}, {"input": "x", "output": "x"}, {"input": "y", "output": ""}],
            5,
        )
        == gen
    )

    f = FilterConfig()
    assert filter_reason("Write a haiku about autumn leaves.", f) is None
    assert filter_reason("Hi there", f) == "too_short"
    assert filter_reason(" ".join(["word"] * 151), f) == "too_long"
    assert filter_reason("Plot the sales figures for each month.", f) == "blacklist"
    assert filter_reason("Please go to the store and buy milk.", f) == "blacklist"
    assert filter_reason("Write a program that sorts a list.", f) == "banned_prefix"
    assert filter_reason("- List three fruits please.", f) == "leading_punctuation"
    assert filter_reason("Écris un poème sur la mer.", f) == "non_ascii"
    assert filter_reason("Explain how maple syrup is made.", f) is None  # 'map' only as a whole word


def test_seed_file_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "instruction": "x", "instances": [], "is_classification": false}\n')
    with pytest.raises(ConfigError, match=r"s.jsonl:1: field 'instances'"):
        load_seed_tasks(path)
    path.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"s.jsonl:1: not valid JSON"):
        load_seed_tasks(path)
    path.write_text('{"id": "a", "instruction": "x", "instances": [{"input": "", "output": "y"}]}\n')
    with pytest.raises(ConfigError, match=r"s.jsonl:1: field 'is_classification'"):
        load_seed_tasks(path)


def test_shipped_config_parses():
    from data_gen.self_instruct import SelfInstructConfig
    from kd_core.config import load_yaml, parse_command_line

    path = REPO_ROOT / "configs" / "data_gen" / "self_instruct.yaml"
    cfg = parse_command_line(SelfInstructConfig, ["--config", str(path)], "t")
    assert cfg.teacher.api_key_env == "OPENAI_API_KEY" and cfg.target == load_yaml(path)["target"]


def test_documented_local_server_command_and_foreign_output_dir(server, tmp_path, capsys):
    """docs/data_gen.md: the shipped config pointed at a local no-auth server; a dir from another run is refused."""
    out = tmp_path / "si"
    command = [
        "self-instruct",
        "--config",
        str(REPO_ROOT / "configs" / "data_gen" / "self_instruct.yaml"),
        "--teacher.base_url",
        server.base_url,
        "--teacher.api_key_env",
        "null",
        "--teacher.model",
        "my-model",
        "--target",
        "6",
        "--prompts_per_round",
        "2",
        "--output.dir",
        str(out),
        "--output.progress",
        "false",
    ]
    assert data_gen_main(command) == 0 and len({r["instruction"] for r in read_rows(out)}) == 6
    capsys.readouterr()
    assert data_gen_main([*command, "--seed", "1"]) == 2
    assert "seed:" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert data_gen_main([*command[:-4], "--output.dir", str(tmp_path / "other")]) == 2
    assert "not a self-instruct output directory" in capsys.readouterr().err


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data_gen_main(["self-instruct", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in ("--teacher.max_cost_usd", "--teacher.api_key_env", "--filters.rouge_threshold", "--output.formats"):
        assert field in text


def test_a_finished_cot_output_is_refused_untouched_and_still_resumes(tmp_path, capsys):
    """Issue 15, case 3: `data-gen self-instruct` pointed at a finished `data-gen cot` output used to replace its
    config and cache, crash (KeyError: 'instances') and leave the cot output unresumable. Now it is refused and the
    tree stays byte-identical, also for a cot output of an earlier version (no marker: recognised by its config)."""
    from kd_core import ownership
    from tests.conftest import tree_digest
    from tests.data_gen import test_cot

    cot_server = ScriptedServer(test_cot.responder).start()
    try:
        questions = test_cot.write_questions(tmp_path / "q.jsonl", test_cot.GOLDS)
        out = tmp_path / "cot"
        assert data_gen_main(test_cot.args(cot_server, questions, out)) == 0
        assert json.loads((out / ownership.MARKER).read_text())["command"] == "data-gen cot"
        self_instruct = [
            "self-instruct",
            "--teacher.base_url",
            cot_server.base_url,
            "--teacher.api_key_env",
            "null",
            "--teacher.model",
            "scripted",
            "--target",
            "4",
            "--output.dir",
            str(out),
            "--output.progress",
            "false",
        ]
        for legacy in (False, True):
            if legacy:
                (out / ownership.MARKER).unlink()
            capsys.readouterr()
            before = tree_digest(out)
            assert data_gen_main(self_instruct) == 2
            err = capsys.readouterr().err
            # Unmarked (a version before markers), another command's output is told from a user's folder by no one.
            held = (
                "files not written by this command, and no ownership marker"
                if legacy
                else "a finished data-gen cot output"
            )
            assert f"is not a self-instruct output directory (it holds {held})" in err, err
            assert tree_digest(out) == before
        calls = cot_server.total
        assert data_gen_main(test_cot.args(cot_server, questions, out)) == 0  # the cot output still resumes
        assert cot_server.total == calls and len(test_cot.rows(out)) == 3
    finally:
        cot_server.stop()
