"""Loopback servers for exercising the engine for real: a scripted OpenAI-compatible server and a fault proxy.

* :class:`ScriptedServer` answers ``POST /v1/chat/completions`` from a Python function of the request body, with an
  optional fixed latency; it counts every request by the hash of its messages and by its ``Authorization`` header,
  and answers an HTTP error where the function returns an :class:`ErrorReply`. Used by the tests for deterministic
  pipeline logic and by ``bench/generation.py`` for throughput (run it in another process with
  ``python -m data_gen.testing --latency 0.2``).
* :class:`FaultProxy` forwards to a real server (``transformers serve``) and injects, per request, a fault from a
  schedule: 429 with ``Retry-After``, 500, a hang past the client timeout, malformed JSON, a body cut mid-transfer,
  or an answer truncated to ``finish_reason="length"``.

Both are plain asyncio HTTP/1.1 on 127.0.0.1 running in a background thread, so a test can start them in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Responder = Callable[[dict[str, Any]], "str | tuple[str, str] | ErrorReply"]


@dataclass
class ErrorReply:
    """A responder's answer that is an HTTP error: ``status`` with ``{"error": {"message": message}}``."""

    status: int
    message: str


def messages_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()[:16]


async def read_http_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    """(method, path, headers, body) of one request, or None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, path, headers, body


def http_response(status: int, body: bytes, extra_headers: dict[str, str] | None = None, *,
                  keep_alive: bool = True, content_length: int | None = None) -> bytes:
    reasons = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body) if content_length is None else content_length),
        "Connection": "keep-alive" if keep_alive else "close",
        **(extra_headers or {}),
    }
    head = f"HTTP/1.1 {status} {reasons.get(status, 'Status')}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + body


def chat_completion_body(model: str, text: str, finish_reason: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{time.time_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max(1, len(text) // 4),
                  "total_tokens": prompt_tokens + max(1, len(text) // 4)},
    }


class _ThreadedServer:
    """Runs connections through the subclass's ``_handle(reader, writer)`` on a private loop in a daemon thread."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> _ThreadedServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop)
        self._server = future.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            # Abort open connections (keep-alive ones, a simulated hang) so every handler returns on its own.
            for writer in list(self._writers):
                writer.transport.abort()
            for _ in range(100):
                if not self._writers:
                    break
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class ScriptedServer(_ThreadedServer):
    """An OpenAI-compatible chat endpoint whose answers come from ``responder(body)`` (text, or (text, finish))."""

    def __init__(self, responder: Responder, latency_s: float = 0.0) -> None:
        super().__init__()
        self.responder = responder
        self.latency_s = latency_s
        self.counts: Counter[str] = Counter()  # requests per messages-hash
        self.authorizations: Counter[str] = Counter()  # chat requests per Authorization header ('' = none sent)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while (request := await read_http_request(reader)) is not None:
                method, path, headers, raw = request
                if path.endswith("/health") or path.endswith("/models"):
                    writer.write(http_response(200, b'{"status":"ok","data":[]}'))
                elif method == "POST" and path.endswith("/chat/completions"):
                    body = json.loads(raw)
                    self.counts[messages_hash(body)] += 1
                    self.authorizations[headers.get("authorization", "")] += 1
                    if self.latency_s:
                        await asyncio.sleep(self.latency_s)
                    answer = self.responder(body)
                    if isinstance(answer, ErrorReply):
                        error = json.dumps({"error": {"message": answer.message}}).encode()
                        writer.write(http_response(answer.status, error))
                        await writer.drain()
                        continue
                    text, finish = (answer, "stop") if isinstance(answer, str) else answer
                    prompt_tokens = sum(len(m["content"]) // 4 + 4 for m in body["messages"])
                    payload = chat_completion_body(body.get("model", "scripted"), text, finish, prompt_tokens)
                    writer.write(http_response(200, json.dumps(payload).encode()))
                else:
                    writer.write(http_response(404, b'{"error":"not found"}'))
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


FAULTS = ("429", "500", "hang", "malformed", "cut", "length")


class FaultProxy(_ThreadedServer):
    """Forwards to ``upstream`` (host, port); the n-th chat request suffers ``schedule[n]`` (None = pass through)."""

    def __init__(self, upstream: tuple[str, int], schedule: list[str | None], hang_s: float = 30.0,
                 retry_after_s: float = 1.0) -> None:
        super().__init__()
        unknown = [f for f in schedule if f is not None and f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {FAULTS}")
        self.upstream = upstream
        self.schedule = list(schedule)
        self.hang_s = hang_s
        self.retry_after_s = retry_after_s
        self.injected: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()  # chat requests that reached the upstream, per messages-hash
        self._n = 0

    async def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self.upstream)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.upstream[0]}:{self.upstream[1]}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        for name in ("authorization",):
            if name in headers:
                head += f"{name}: {headers[name]}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        raw = await reader.read()  # Connection: close, so the upstream ends the body with EOF
        writer.close()
        _, _, payload = raw.partition(b"\r\n\r\n")
        status = int(raw.split(b" ", 2)[1])
        return http_response(status, payload, keep_alive=False)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            request = await read_http_request(reader)
            if request is None:
                return
            method, path, headers, body = request
            fault = None
            if path.endswith("/chat/completions"):
                fault = self.schedule[self._n] if self._n < len(self.schedule) else None
                self._n += 1
            if fault is not None:
                self.injected[fault] += 1
            if fault == "429":
                writer.write(http_response(429, b'{"error":{"message":"slow down"}}',
                                           {"Retry-After": str(self.retry_after_s)}, keep_alive=False))
            elif fault == "500":
                writer.write(http_response(500, b'{"error":{"message":"boom"}}', keep_alive=False))
            elif fault == "hang":  # say nothing until the client gives up (closes) or hang_s passes
                try:
                    await asyncio.wait_for(reader.read(), self.hang_s)
                except asyncio.TimeoutError:
                    pass
            elif fault == "malformed":
                writer.write(http_response(200, b'{"id": "x", "choices": [', keep_alive=False))
            else:
                if path.endswith("/chat/completions"):
                    self.forwarded[messages_hash(json.loads(body))] += 1
                answer = await self._forward(method, path, headers, body)
                if fault == "cut":  # promise the full body, send half, hang up
                    head, _, payload = answer.partition(b"\r\n\r\n")
                    answer = head + b"\r\n\r\n" + payload[: len(payload) // 2]
                elif fault == "length":
                    head, _, payload = answer.partition(b"\r\n\r\n")
                    data = json.loads(payload)
                    content = data["choices"][0]["message"]["content"] or ""
                    data["choices"][0]["message"]["content"] = content[: len(content) // 2]
                    data["choices"][0]["finish_reason"] = "length"
                    answer = http_response(200, json.dumps(data).encode(), keep_alive=False)
                writer.write(answer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def echo_responder(body: dict[str, Any]) -> str:
    """Answers with a short text derived from the last message (deterministic)."""
    return "echo: " + body["messages"][-1]["content"][:64]


def main() -> None:
    """``python -m data_gen.testing --latency 0.2``: serve echo answers on a free port; prints the port, runs until killed."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    server = ScriptedServer(echo_responder, latency_s=args.latency).start()
    print(server.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
