"""The teacher engine against real loopback servers: ``transformers serve`` behind a fault proxy, a scripted server,
an unreachable port; the answer cache, the journal, the budget cap and the local batched backend."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from unittest.mock import ANY

import pytest

from data_gen.backends import LocalBackend
from data_gen.cache import AnswerCache
from data_gen.config import DecodingConfig, TeacherConfig
from data_gen.engine import BudgetError, CallPlan, Engine, EngineError, ParseError, Request, build_engine, preflight
from data_gen.fault_proxy import FaultProxy
from data_gen.journal import Journal
from data_gen.testing import ScriptedServer, echo_responder
from kd_core.config import ConfigError
from tests.conftest import REPO_ROOT, free_port, transformers_serve


@pytest.fixture(scope="session")
def serve(model_dirs):
    """ONE real ``transformers serve`` on 127.0.0.1 for the session, serving the tiny teacher."""
    with transformers_serve(model_dirs["teacher"], model_dirs["teacher"].parent / "serve.log") as port:
        yield {"port": port, "model": str(model_dirs["teacher"])}


def teacher(model: str, base_url: str, **overrides) -> TeacherConfig:
    """A teacher config with short timeouts and backoff, so fault tests finish in seconds."""
    values = dict(
        model=model,
        base_url=base_url,
        api_key_env=None,
        concurrency=4,
        timeout_s=3.0,
        max_retries=4,
        backoff_base_s=0.05,
        backoff_max_s=0.2,
        decoding=DecodingConfig(temperature=0.0, max_tokens=8),
    )
    values.update(overrides)
    return TeacherConfig(**values)


def requests_for(n: int, prefix: str = "q") -> list[Request]:
    return [
        Request(f"{prefix}{i}", [{"role": "user", "content": f"Say something about item number {i}."}])
        for i in range(n)
    ]


async def collect(engine: Engine, requests: list[Request], parse=None) -> list:
    out = [r async for r in engine.run(requests, parse)]
    await engine.aclose()
    return out


def test_transformers_serve_through_fault_proxy(serve, tmp_path):
    """429+Retry-After, 500, a hang past the timeout, malformed JSON and a cut body: every record still arrives."""
    faults = ["429", "500", "hang", "malformed", "cut"]
    proxy = FaultProxy(("127.0.0.1", serve["port"]), faults, hang_s=30.0, retry_after_s=0.5).start()
    try:
        # Generous timeout, 2 in flight: the CPU server answers one call at a time and this machine is shared.
        cfg = teacher(serve["model"], proxy.base_url, timeout_s=10.0, concurrency=2)
        engine = build_engine(cfg, tmp_path, progress=False)
        started = time.monotonic()
        results = asyncio.run(collect(engine, requests_for(6)))
        assert sorted(r.request.id for r in results) == [f"q{i}" for i in range(6)]
        assert all(r.ok and isinstance(r.text, str) and r.output_tokens > 0 for r in results)
        assert dict(proxy.injected) == {f: 1 for f in faults}
        # At least one retry per fault kind (a slow CPU server can add genuine timeouts on top).
        assert all(engine.stats.retries[k] >= 1 for k in ("429", "500", "timeout", "malformed", "connection"))
        assert time.monotonic() - started >= 0.5  # the Retry-After pause was honoured
        # Every answer that reached the server is cached: a rerun sends nothing upstream.
        upstream = sum(proxy.forwarded.values())
        engine = build_engine(cfg, tmp_path, progress=False)
        again = asyncio.run(collect(engine, requests_for(6)))
        assert all(r.cached for r in again) and sum(proxy.forwarded.values()) == upstream
        assert {r.request.id: r.text for r in again} == {r.request.id: r.text for r in results}
    finally:
        proxy.stop()


def storm_verdict(engine: Engine, proxy: FaultProxy, answered: int, elapsed: float) -> list[str]:
    """What makes an engine storm a serial server, each bound taken from the same run, so that it holds on a busy
    machine as on an idle one: requests sent again beyond one round (the calls in flight when the server first fell
    behind may time out once; after the cut, none should), a quarter of the server's time spent on answers nobody
    received, or the server idle for more than 40% of the run."""
    resent = proxy.received - answered
    rounds = min(engine.concurrency.maximum, engine.concurrency.highest)
    failed = []
    if resent > rounds:
        failed.append(f"{resent} requests sent again, more than one round ({rounds:.0f})")
    if proxy.wasted_s > 0.25 * proxy.busy_s:
        failed.append(f"{proxy.wasted_s:.1f} of the server's {proxy.busy_s:.1f} s on answers nobody received")
    if proxy.busy_s < 0.6 * elapsed:
        failed.append(f"the server busy {proxy.busy_s:.1f} of {elapsed:.1f} s")
    return failed


async def run_until_stormed(engine: Engine, requests: list[Request], proxy: FaultProxy, deadline_s: float) -> float:
    """Runs the engine until it has sent more than two rounds of requests (so it cannot pass :func:`storm_verdict`),
    finishes, gives up or ``deadline_s`` passes; returns the seconds it ran. Ending on the count, not on a duration,
    keeps the test as short on a slow machine as on a fast one."""

    async def answer() -> None:
        async for _ in engine.run(requests):
            pass

    task = asyncio.ensure_future(answer())
    started = time.monotonic()
    while not task.done() and proxy.received <= len(requests) + 2 * engine.concurrency.maximum:
        if time.monotonic() - started > deadline_s:
            break
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # EngineError (it gave up) is a storm's end too
    await engine.aclose()
    return elapsed


def test_a_server_that_answers_one_at_a_time_is_not_stormed(serve, tmp_path):
    """transformers serve behind a proxy that lets one request through at a time at 60 ms per token on its own clock
    (1.44 s an answer on any machine): 8 requests, up to 8 in flight, timeout_s 3, too short for a queue of 8 (12 s).
    The engine backs off to the server's pace: at most one round of requests sent twice, little work on answers
    nobody receives, the server busy nearly all along. The old engine (fixed concurrency, plain answers) against the
    same proxy fails the same verdict, so the verdict tells a storm from convergence (bench/serial_server.py has the
    figures)."""

    def proxy() -> FaultProxy:
        return FaultProxy(("127.0.0.1", serve["port"]), [], serial=True, token_delay_s=0.06).start()

    settings = dict(
        concurrency=8, timeout_s=3.0, max_retries=6, decoding=DecodingConfig(temperature=0.0, max_tokens=24)
    )
    adaptive = proxy()
    try:
        engine = build_engine(teacher(serve["model"], adaptive.base_url, **settings), tmp_path / "a", progress=False)
        started = time.monotonic()
        results = asyncio.run(collect(engine, requests_for(8)))
        elapsed = time.monotonic() - started
    finally:
        adaptive.stop()
    figures = (
        dict(engine.stats.retries),
        adaptive.received,
        adaptive.abandoned,
        adaptive.skipped,
        adaptive.wasted_s,
        adaptive.busy_s,
        elapsed,
        engine.concurrency.highest,
    )
    assert sorted(r.request.id for r in results) == [f"q{i}" for i in range(8)] and all(r.ok for r in results)
    limit = engine.concurrency
    assert limit.decreases >= 1 and limit.lowest <= 2 < limit.maximum, figures  # it backed off
    assert storm_verdict(engine, adaptive, len(results), elapsed) == [], figures

    old = proxy()
    try:
        cfg = teacher(serve["model"], old.base_url, **settings, adaptive_concurrency=False, stream=False)
        engine = build_engine(cfg, tmp_path / "o", progress=False)
        elapsed = asyncio.run(run_until_stormed(engine, requests_for(8), old, deadline_s=60.0))
    finally:
        old.stop()
    verdict = storm_verdict(engine, old, old.completed, elapsed)
    assert verdict and "sent again" in verdict[0], (verdict, old.received, old.completed, old.wasted_s, elapsed)


def test_length_answers_are_retried_when_the_pipeline_rejects_them(tmp_path):
    """An answer cut at max_tokens fails the pipeline's parse; the retry is cached under its own attempt key."""
    server = ScriptedServer(echo_responder).start()
    proxy = FaultProxy(("127.0.0.1", server.port), ["length", None, "length"]).start()
    try:

        def parse(text: str, finish_reason: str) -> str:
            if finish_reason == "length":
                raise ParseError("truncated")
            return text

        cfg = teacher("scripted", proxy.base_url, concurrency=1)
        results = asyncio.run(collect(build_engine(cfg, tmp_path, progress=False), requests_for(2), parse))
        results.sort(key=lambda r: r.request.id)
        assert [r.parsed for r in results] == [f"echo: Say something about item number {i}." for i in range(2)]
        assert sum(r.attempts for r in results) == 4  # two cut answers retried (which request got them varies)
        engine = build_engine(cfg, tmp_path, progress=False)
        again = sorted(asyncio.run(collect(engine, requests_for(2), parse)), key=lambda r: r.request.id)
        assert [r.parsed for r in again] == [r.parsed for r in results]
        assert server.total == 4 and engine.stats.calls == 0 and engine.stats.cached == 4  # replayed, not re-asked
    finally:
        proxy.stop()
        server.stop()


def test_exhausted_parse_retries_are_a_counted_rejection(tmp_path):
    server = ScriptedServer(lambda body: "not json").start()
    try:

        def parse(text: str, finish_reason: str) -> None:
            raise ParseError("no_json")

        engine = build_engine(teacher("s", server.base_url, max_parse_retries=2), tmp_path, progress=False)
        (result,) = asyncio.run(collect(engine, requests_for(1), parse))
        assert result.error == "parse:no_json" and result.attempts == 3 and server.total == 3
        assert engine.stats.rejections["parse:no_json"] == 1
    finally:
        server.stop()


def test_unreachable_server_fails_clearly_after_bounded_retries(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = build_engine(teacher("m", url, max_retries=2), tmp_path, progress=False)
    with pytest.raises(EngineError, match=r"failed request q0 3 times.*connection"):
        asyncio.run(collect(engine, requests_for(1)))


def test_missing_api_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="DISTILL_TEST_KEY"):
        build_engine(teacher("m", "http://127.0.0.1:1/v1", api_key_env="DISTILL_TEST_KEY"), tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written


def test_api_key_is_sent_but_never_stored(tmp_path, monkeypatch):
    seen = []
    server = ScriptedServer(echo_responder).start()
    monkeypatch.setenv("DISTILL_TEST_KEY", "sk-secret-123")
    try:
        engine = build_engine(teacher("m", server.base_url, api_key_env="DISTILL_TEST_KEY"), tmp_path, progress=False)
        seen.append(engine.backend.client.api_key)
        asyncio.run(collect(engine, requests_for(2)))
    finally:
        server.stop()
    assert seen == ["sk-secret-123"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"sk-secret-123" not in path.read_bytes(), path


def test_budget_cap_stops_cleanly_and_preflight_refuses(tmp_path):
    server = ScriptedServer(echo_responder).start()
    try:
        # Reservation per call = (est. input + 8 max_tokens) tokens at $1000/M; the cap fits only a few calls.
        cfg = teacher(
            "m", server.base_url, price_input_per_m=1000.0, price_output_per_m=1000.0, max_cost_usd=0.1, concurrency=1
        )
        engine = build_engine(cfg, tmp_path, progress=False)
        results = asyncio.run(collect(engine, requests_for(20)))
        assert engine.stopped == "budget"
        assert 0 < len(results) < 20 and server.total == len(results)
        assert engine.stats.cost_usd <= 0.1
        with pytest.raises(BudgetError, match="exceeds the budget"):
            preflight(cfg, [CallPlan("calls", 1000, 100)])
    finally:
        server.stop()


def test_rate_limiter_spaces_requests(tmp_path):
    server = ScriptedServer(echo_responder).start()
    try:
        # 120 rpm with a 10 s burst allowance = 20 immediate calls, then one every 0.5 s.
        engine = build_engine(
            teacher("m", server.base_url, requests_per_minute=120, concurrency=8), tmp_path, progress=False
        )
        started = time.monotonic()
        asyncio.run(collect(engine, requests_for(23)))
        assert time.monotonic() - started >= 1.4
    finally:
        server.stop()


def test_retry_after_pauses_every_worker():
    from kd_core.limiter import RateLimiter

    async def scenario() -> list[float]:
        limiter = RateLimiter(None, None)
        limiter.pause(0.3)  # what a 429 with Retry-After: 0.3 does
        started = time.monotonic()

        async def worker() -> float:
            await limiter.acquire(10)
            return time.monotonic() - started

        return await asyncio.gather(*(worker() for _ in range(4)))

    assert all(waited >= 0.29 for waited in asyncio.run(scenario()))


def test_journal_drops_a_torn_last_line_and_resumes(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        assert journal.append({"id": "a", "x": 1}) and journal.append({"id": "b", "x": 2})
        assert not journal.append({"id": "a", "x": 3})  # stable ids: never duplicated
    with open(path, "ab") as f:
        f.write(b'{"id": "c", "x"')  # what a kill -9 mid-write leaves
    journal = Journal(path).open()
    assert journal.dropped_torn_line and list(journal.records) == ["a", "b"]
    journal.append({"id": "c", "x": 3})
    journal.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"id": "a", "x": 1, "_sum": ANY},
        {"id": "b", "x": 2, "_sum": ANY},
        {"id": "c", "x": 3, "_sum": ANY},
    ]
    path.write_text('{"id":"a"}\nnot json\n')
    with pytest.raises(ValueError, match="journal.jsonl:2: corrupt"):
        Journal(path).open()


def test_journal_reports_a_corrupted_line_with_file_and_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        for i in range(3):
            journal.append({"id": str(i), "answer": f"value {i}"})
    lines = path.read_bytes().splitlines(keepends=True)
    assert all(b'"_sum":"' in line for line in lines)
    # One byte flipped inside a string: still valid JSON, so only the checksum can tell.
    lines[1] = lines[1].replace(b"value 1", b"value 7")
    path.write_bytes(b"".join(lines) + b'{"id":"3","ans')  # plus a torn last line, tolerated as before
    with pytest.raises(ValueError, match=r"journal.jsonl:2: corrupt journal line \(checksum mismatch"):
        Journal(path).open()
    # A checksummed line that lost its checksum field is refused too.
    lines[1] = b'{"id":"1","answer":"value 1"}\n'
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match="journal.jsonl:2: corrupt journal line .no valid checksum"):
        Journal(path).open()


def test_journal_of_the_earlier_version_still_loads(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"id":"a","x":1}\n{"id":"b","x":2}\n{"id":"c","x"')  # no checksums, torn tail
    with Journal(path) as journal:
        assert journal.dropped_torn_line and list(journal.records) == ["a", "b"]
        journal.append({"id": "c", "x": 3})
    reopened = Journal(path).open()
    assert reopened.records == {"a": {"id": "a", "x": 1}, "b": {"id": "b", "x": 2}, "c": {"id": "c", "x": 3}}
    reopened.close()


def test_cache_key_covers_decoding_and_sample(tmp_path):
    from data_gen.cache import cache_key

    messages = [{"role": "user", "content": "hi"}]
    base = cache_key("m", messages, {"temperature": 0.7, "top_p": 1.0}, 0)
    assert base == cache_key("m", messages, {"top_p": 1.0, "temperature": 0.7}, 0)
    assert base != cache_key("m", messages, {"temperature": 0.8, "top_p": 1.0}, 0)
    assert base != cache_key("m", messages, {"temperature": 0.7, "top_p": 1.0}, 1)
    assert base != cache_key("m2", messages, {"temperature": 0.7, "top_p": 1.0}, 0)
    cache = AnswerCache(tmp_path / "c.sqlite")
    cache.put(base, "answer", "stop", 3, 1)
    assert cache.get(base).text == "answer" and len(cache) == 1
    cache.close()


def test_local_backend_batches_with_left_padding(model_dirs, tmp_path):
    """Greedy answers from one padded, length-bucketed batch equal those generated one prompt at a time."""
    cfg = teacher(str(model_dirs["teacher"]), None, backend="local", batch_size=4, concurrency=8)
    prompts = [Request(f"l{i}", [{"role": "user", "content": "word " * (1 + 3 * i)}]) for i in range(5)]
    engine = Engine(cfg, AnswerCache(tmp_path / "c.sqlite"), LocalBackend(cfg), progress=False)
    batched = {r.request.id: r for r in asyncio.run(collect(engine, prompts))}
    assert all(r.output_tokens <= 8 and r.finish_reason in ("stop", "length") for r in batched.values())
    single_cfg = teacher(str(model_dirs["teacher"]), None, backend="local", batch_size=1, concurrency=1)
    engine = Engine(single_cfg, AnswerCache(tmp_path / "c1.sqlite"), LocalBackend(single_cfg), progress=False)
    single = {r.request.id: r for r in asyncio.run(collect(engine, prompts))}
    assert {k: r.text for k, r in batched.items()} == {k: r.text for k, r in single.items()}
    assert all(r.text for r in single.values())


def test_local_backend_batches_fill_beyond_concurrency(model_dirs, tmp_path):
    """With the local backend, ``concurrency`` below ``batch_size`` must not shrink the batches (it once capped
    every generate() call at the default 16 prompts whatever batch_size said)."""
    cfg = teacher(str(model_dirs["teacher"]), None, backend="local", batch_size=4, concurrency=1)
    assert cfg.in_flight == 4
    backend = LocalBackend(cfg)
    sizes: list[int] = []
    generate = backend._generate
    backend._generate = lambda prompts, params: sizes.append(len(prompts)) or generate(prompts, params)
    prompts = [Request(f"b{i}", [{"role": "user", "content": f"word {i}"}]) for i in range(8)]
    engine = Engine(cfg, AnswerCache(tmp_path / "c.sqlite"), backend, progress=False)
    assert len(asyncio.run(collect(engine, prompts))) == 8
    assert sum(sizes) == 8 and max(sizes) > 1, sizes


def test_local_backend_waits_for_callers_a_few_turns_behind(model_dirs, tmp_path):
    """Calls that arrive a few milliseconds apart (callers still writing the previous answer) and differ only in
    their seed share one batch: the worker once took only what was queued in the first event-loop turn (1 row, then
    the other 7), and split calls by seed."""
    cfg = teacher(str(model_dirs["teacher"]), None, backend="local", batch_size=8, concurrency=8)
    backend = LocalBackend(cfg)
    sizes: list[int] = []
    generate = backend._generate
    backend._generate = lambda prompts, params: sizes.append(len(prompts)) or generate(prompts, params)
    params = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 2}

    async def caller(i: int):
        await asyncio.sleep(0.003 * i)  # as a caller busy with its previous answer
        seeded = {**params, "seed": i % 2}  # cot's samples 0 and 1 carry seeds 0 and 1: one batch still
        return await backend.complete([{"role": "user", "content": f"word {i}"}], seeded)

    async def main():
        return await asyncio.gather(*(caller(i) for i in range(8)))

    assert len(asyncio.run(main())) == 8
    assert sizes == [8], sizes


def test_local_backend_shards_across_processes(model_dirs, tmp_path):
    """Under ``accelerate launch`` two processes each answer half of the requests and both see every result."""
    script = tmp_path / "shard.py"
    script.write_text(
        "import asyncio, json, os, sys\n"
        "from data_gen.config import TeacherConfig, DecodingConfig\n"
        "from data_gen.engine import Request, build_engine\n"
        "cfg = TeacherConfig(model=sys.argv[1], backend='local', api_key_env=None,\n"
        "                    decoding=DecodingConfig(temperature=0.0, max_tokens=4))\n"
        "engine = build_engine(cfg, sys.argv[2], progress=False)\n"
        "reqs = [Request(f'r{i}', [{'role': 'user', 'content': 'word ' * (i + 1)}]) for i in range(6)]\n"
        "results = asyncio.run(engine.map(reqs))\n"
        "record = [engine.rank, engine.world, engine.stats.calls, [r.request.id for r in results]]\n"
        "# One file per rank: two ranks printing at once interleave their lines on a fast machine.\n"
        "open(os.path.join(sys.argv[3], f'result-{engine.rank}.json'), 'w').write(json.dumps(record))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            str(script),
            str(model_dirs["teacher"]),
            str(tmp_path / "out"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    ids = [f"r{i}" for i in range(6)]
    assert records == [[0, 2, 3, ids], [1, 2, 3, ids]]


def test_local_backend_ignores_the_checkpoint_generation_config(model_dirs, tmp_path):
    """A teacher whose generation_config.json sets a repetition penalty, min_p and an n-gram ban answers as the
    same weights without it (neutral settings); ``decoding.generation_kwargs`` switches a knob back on."""
    import shutil

    from transformers import GenerationConfig

    opinionated = tmp_path / "opinionated"
    shutil.copytree(model_dirs["teacher"], opinionated)
    settings = GenerationConfig(do_sample=True, repetition_penalty=1.3, min_p=0.2, no_repeat_ngram_size=1)
    settings.save_pretrained(opinionated)
    prompts = [Request(f"g{i}", [{"role": "user", "content": "word " * (1 + 3 * i)}]) for i in range(3)]

    def answers(model_dir, name, **decoding) -> dict[str, str]:
        cfg = teacher(
            str(model_dir),
            None,
            backend="local",
            batch_size=4,
            decoding=DecodingConfig(temperature=0.0, max_tokens=12, **decoding),
        )
        engine = Engine(cfg, AnswerCache(tmp_path / f"{name}.sqlite"), LocalBackend(cfg), progress=False)
        return {r.request.id: r.text for r in asyncio.run(collect(engine, prompts))}

    plain = answers(model_dirs["teacher"], "plain")
    assert answers(opinionated, "neutral") == plain
    # no_repeat_ngram_size 1 bans every token already in the context: the greedy answers change
    assert answers(opinionated, "banned", generation_kwargs={"no_repeat_ngram_size": 1}) != plain
    with pytest.raises(ValueError, match="decoding.generation_kwargs: transformers settings of the local backend"):
        teacher("gpt", None, decoding=DecodingConfig(generation_kwargs={"min_p": 0.1}))
    with pytest.raises(ValueError, match="generation_kwargs.temperature: set by its own option"):
        DecodingConfig(generation_kwargs={"temperature": 0.1})
