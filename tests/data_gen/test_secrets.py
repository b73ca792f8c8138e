"""Secrets in every form never reach an output or a printed line: a key in the base URL's query string and fragment,
a header given in the config, and the API key itself, through a real ``data-gen cot`` process against a real server on
loopback; the whole output tree (records jsonl and parquet, card, config, journal, cache) and everything the process
printed are searched for each secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_gen.testing import ScriptedServer
from tests.conftest import REPO_ROOT, free_port
from tests.data_gen.test_cot import GOLDS, responder, write_questions

QUERY_KEY = "q7Key0123456789abcdefQUERY"
FRAGMENT_TOKEN = "fr4gmentT0ken987654321"
HEADER_SECRET = "hdr-Secret-Value-24680"
ENV_KEY = "sk-env-Key-13579abcdef"
SECRETS = (QUERY_KEY, FRAGMENT_TOKEN, HEADER_SECRET, ENV_KEY)


def cot(base_url: str, inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISTILL_TEST_KEY": ENV_KEY}
    command = [
        sys.executable,
        "-m",
        "data_gen",
        "cot",
        "--input_file",
        str(inp),
        "--teacher.model",
        "scripted",
        "--teacher.base_url",
        base_url,
        "--teacher.api_key_env",
        "DISTILL_TEST_KEY",
        "--teacher.headers",
        f"{{X-Gateway-Key: {HEADER_SECRET}}}",
        "--output.dir",
        str(out),
        *extra,
    ]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)


def leaks(out: Path, printed: str) -> list[str]:
    """Where any secret appears: a file's bytes, a parquet table's values (compressed on disk), or the output."""
    found = [f"printed: {s}" for s in SECRETS if s in printed]
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        texts = [path.read_bytes().decode("latin-1")]
        if path.suffix == ".parquet":
            texts.append(json.dumps(pq.read_table(path).to_pylist()))
        found += [f"{path.name}: {s}" for s in SECRETS for text in texts if s in text]
    return found


def test_keys_in_the_url_query_fragment_and_headers_reach_the_server_and_nothing_else(tmp_path):
    server = ScriptedServer(responder).start()
    try:
        url = f"{server.base_url}?api-key={QUERY_KEY}&tier=2#access_token={FRAGMENT_TOKEN}"
        inp = write_questions(tmp_path / "q.jsonl", GOLDS)
        out = tmp_path / "cot"
        result = cot(url, inp, out, "--output.formats", "[jsonl, parquet]")
        authorizations, seen = set(server.authorizations), set(server.seen)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    # The live client sent every credential: the key, the URL's query (the fragment stays in the client, as HTTP has
    # it) and the header.
    assert authorizations == {f"Bearer {ENV_KEY}"} and seen == {f"api-key={QUERY_KEY}&tier=2 {HEADER_SECRET}"}
    assert {p.name for p in out.iterdir()} >= {
        "data.jsonl",
        "data.parquet",
        "README.md",
        "config.yaml",
        "journal.jsonl",
        "cache.sqlite",
    }
    assert leaks(out, result.stdout + result.stderr) == []
    saved = (out / "config.yaml").read_text()
    assert "api-key=***&tier=2#access_token=***" in saved and "X-Gateway-Key: '***'" in saved
    record = json.loads((out / "data.jsonl").read_text().splitlines()[0])
    assert record["provenance"]["base_url"].endswith("/v1?api-key=***&tier=2#access_token=***")


def test_an_unreachable_server_error_line_holds_no_key(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1?key={QUERY_KEY}#{FRAGMENT_TOKEN}"
    inp = write_questions(tmp_path / "q.jsonl", GOLDS)
    out = tmp_path / "cot"
    result = cot(url, inp, out, "--teacher.max_retries", "0")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "?key=***#***" in errors[0]
    assert (
        leaks(out, result.stdout + result.stderr) == []
        if out.exists()
        else not any(s in result.stdout + result.stderr for s in SECRETS)
    )


@pytest.mark.parametrize("field", ["--teacher.api_key_env"])
def test_a_hex_key_pasted_as_a_variable_name_is_refused_unechoed(field, tmp_path):
    hex_key = "0f3a9c2e7b1d4f6a8c0e2b4d6f8a1c3e"
    inp = write_questions(tmp_path / "q.jsonl", GOLDS)
    result = cot("http://127.0.0.1:1/v1", inp, tmp_path / "cot", field, hex_key)
    assert result.returncode == 2 and hex_key not in result.stdout + result.stderr and hex_key[:8] not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: teacher: api_key_env: expected the NAME")
    assert not (tmp_path / "cot").exists()
