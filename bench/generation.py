"""Engine throughput against a loopback OpenAI-compatible server with a fixed latency.

    python bench/generation.py --concurrency 64 --latency 0.2 --requests 2000

The server (``python -m data_gen.testing``) runs in its own process so it does not share the client's GIL. With a
fixed latency L and C requests in flight, the ideal rate is C / L requests per second; the engine's achieved rate
(every call through the limiter, the adaptive concurrency limit, the openai client, streamed unless ``--no-stream``,
the SQLite cache and the bookkeeping) is printed
as a ratio of it. Target: >= 0.90 at C=64, L=0.2 s (320 req/s). A bare asyncio client (no openai, no engine) is
and the bare ``openai`` client are measured against the same server afterwards, to tell the engine's own overhead
from the HTTP client's and from a loaded machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_gen.config import DecodingConfig, TeacherConfig
from data_gen.engine import Request, build_engine


async def measure(base_url: str, concurrency: int, n: int, cache_dir: str, stream: bool) -> tuple[float, int]:
    cfg = TeacherConfig(
        model="bench",
        base_url=base_url,
        api_key_env=None,
        concurrency=concurrency,
        decoding=DecodingConfig(max_tokens=16),
        timeout_s=30.0,
        stream=stream,
    )
    engine = build_engine(cfg, cache_dir, progress=False)
    requests = [Request(f"b{i}", [{"role": "user", "content": f"Benchmark prompt number {i}."}]) for i in range(n)]
    # Warm the connection pool outside the timed region (the first connections' setup is not steady state).
    warm = [Request(f"w{i}", [{"role": "user", "content": f"warm {i}"}]) for i in range(concurrency)]
    async for _ in engine.run(warm):
        pass
    started = time.perf_counter()
    done = 0
    async for result in engine.run(requests):
        done += result.ok
    elapsed = time.perf_counter() - started
    await engine.aclose()
    return elapsed, done


async def openai_baseline(port: int, concurrency: int, n: int) -> float:
    """The same calls through bare ``openai`` clients (pools of 8 connections, as the engine uses), nothing else."""
    import openai

    clients = [
        openai.AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        for _ in range(-(-concurrency // 8))
    ]

    async def worker(k: int, count: int) -> None:
        for i in range(count):
            body = {"model": "raw", "messages": [{"role": "user", "content": f"openai {k} {i}"}]}
            await clients[k % len(clients)].post("/chat/completions", body=body, cast_to=dict)

    await asyncio.gather(*(worker(k, 1) for k in range(concurrency)))  # warm the pools
    started = time.perf_counter()
    await asyncio.gather(*(worker(k, n // concurrency) for k in range(concurrency)))
    rate = (n // concurrency * concurrency) / (time.perf_counter() - started)
    for client in clients:
        await client.close()
    return rate


async def raw_baseline(port: int, concurrency: int, n: int) -> float:
    """The same calls over ``concurrency`` bare keep-alive asyncio connections: what this machine allows at all."""

    async def worker(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(count):
            body = json.dumps({"model": "raw", "messages": [{"role": "user", "content": f"raw {i}"}]}).encode()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    return (n // concurrency * concurrency) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--no-stream", action="store_true", help="plain JSON answers (teacher.stream: false)")
    args = parser.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-m", "data_gen.testing", "--latency", str(args.latency)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        port = int(server.stdout.readline())
        with tempfile.TemporaryDirectory() as tmp:
            elapsed, done = asyncio.run(
                measure(f"http://127.0.0.1:{port}/v1", args.concurrency, args.requests, tmp, not args.no_stream)
            )
        client_only = asyncio.run(openai_baseline(port, args.concurrency, args.requests))
        raw = asyncio.run(raw_baseline(port, args.concurrency, args.requests))
    finally:
        server.terminate()
        server.wait()
    ideal = args.concurrency / args.latency
    achieved = done / elapsed
    print(
        f"requests: {done}/{args.requests} in {elapsed:.2f}s; concurrency {args.concurrency}, "
        f"server latency {args.latency * 1000:.0f} ms, {'plain' if args.no_stream else 'streamed'} answers"
    )
    print(f"achieved {achieved:.1f} req/s, ideal {ideal:.1f} req/s, achieved/ideal = {achieved / ideal:.3f}")
    print(
        f"openai client alone on the same server: {client_only:.1f} req/s = {client_only / ideal:.3f} of ideal; "
        f"engine/openai-alone = {achieved / client_only:.3f} (the engine's own overhead)"
    )
    print(
        f"bare asyncio client on the same server: {raw:.1f} req/s = {raw / ideal:.3f} of ideal "
        f"(what this machine allows now); engine/bare = {achieved / raw:.3f}"
    )


if __name__ == "__main__":
    main()
