"""Loopback servers for exercising the engine for real: a scripted OpenAI-compatible server, and the HTTP
pieces it shares with the fault proxy (:mod:`data_gen.fault_proxy`).

* :class:`ScriptedServer` answers ``POST /v1/chat/completions`` from a Python function of the request body, with an
  optional fixed latency, as one JSON body or, when the request asks ``"stream": true``, as server-sent events; it
  counts every request by the hash of its messages and by its ``Authorization`` header, and answers an HTTP error
  where the function returns an :class:`ErrorReply`. Used by the tests for deterministic
  pipeline logic and by ``bench/generation.py`` for throughput (run it in another process with
  ``python -m data_gen.testing --latency 0.2``). Given a second function, it answers ``POST /v1/completions`` too.
* :class:`ForcedTeacher` puts a real (tiny) causal LM behind a scripted answer: the text is the script's, and the
  log-probabilities of its tokens are the model's own, as vLLM reports them for an answer it sampled, so
  ``teacher.logprobs`` runs in seconds without a vLLM (the real one is in tests/data_gen/test_logprobs_vllm.py).

Both servers are plain asyncio HTTP/1.1 on 127.0.0.1 running in a background thread (:class:`ThreadedServer`), so
a test can start them in-process.
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

Responder = Callable[[dict[str, Any]], "str | tuple[str, str] | ErrorReply | dict[str, Any]"]


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


def http_response(
    status: int,
    body: bytes,
    extra_headers: dict[str, str] | None = None,
    *,
    keep_alive: bool = True,
    content_length: int | None = None,
) -> bytes:
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
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": max(1, len(text) // 4),
            "total_tokens": prompt_tokens + max(1, len(text) // 4),
        },
    }


def stream_head(*, keep_alive: bool = True) -> bytes:
    """The head of a chunked ``text/event-stream`` response (the body follows as :func:`http_chunk` pieces)."""
    return (
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode("latin-1")


def http_chunk(data: bytes) -> bytes:
    """One piece of a chunked body; ``b""`` is the terminating chunk."""
    return f"{len(data):x}\r\n".encode("latin-1") + data + b"\r\n"


def sse_event(payload: dict[str, Any] | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


def chat_completion_events(model: str, text: str, finish_reason: str, prompt_tokens: int) -> list[bytes]:
    """The answer as OpenAI streams it: a role chunk, one content chunk per word, the finish chunk with usage,
    ``[DONE]``."""
    body = chat_completion_body(model, text, finish_reason, prompt_tokens)
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": model}

    def chunk(delta: dict[str, str], finish: str | None = None, **extra: Any) -> bytes:
        return sse_event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    words = [w for w in text.replace(" ", " \0").split("\0") if w]
    return [
        chunk({"role": "assistant"}),
        *(chunk({"content": w}) for w in words),
        chunk({}, finish_reason, usage=body["usage"]),
        sse_event("[DONE]"),
    ]


class ThreadedServer:
    """Runs connections through the subclass's ``_handle(reader, writer)`` on a private loop in a daemon thread."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> ThreadedServer:
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
            # Handlers still running (a request queued for FaultProxy's serial slot) are cancelled.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class ScriptedServer(ThreadedServer):
    """An OpenAI-compatible chat endpoint whose answers come from ``responder(body)`` (text, or (text, finish), or a
    whole answer body as a dict, sent as it is and never streamed)."""

    def __init__(self, responder: Responder, latency_s: float = 0.0, completions: Responder | None = None) -> None:
        super().__init__()
        self.responder = responder
        self.completions = completions  # POST /v1/completions: a dict (the answer) or an ErrorReply; None = 404
        self.latency_s = latency_s
        self.counts: Counter[str] = Counter()  # requests per messages-hash
        self.authorizations: Counter[str] = Counter()  # chat requests per Authorization header ('' = none sent)
        self.seen: Counter[str] = Counter()  # chat requests per query string and gateway header, as a server sees them

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while (request := await read_http_request(reader)) is not None:
                method, target, headers, raw = request
                path, _, query = target.partition("?")
                if path.endswith("/health") or path.endswith("/models"):
                    writer.write(http_response(200, b'{"status":"ok","data":[]}'))
                elif method == "POST" and path.endswith("/chat/completions"):
                    body = json.loads(raw)
                    self.counts[messages_hash(body)] += 1
                    self.authorizations[headers.get("authorization", "")] += 1
                    self.seen[f"{query} {headers.get('x-gateway-key', '')}"] += 1
                    if self.latency_s:
                        await asyncio.sleep(self.latency_s)
                    answer = self.responder(body)
                    if isinstance(answer, ErrorReply):
                        error = json.dumps({"error": {"message": answer.message}}).encode()
                        writer.write(http_response(answer.status, error))
                        await writer.drain()
                        continue
                    if isinstance(answer, dict):
                        writer.write(http_response(200, json.dumps(answer).encode()))
                        await writer.drain()
                        continue
                    text, finish = (answer, "stop") if isinstance(answer, str) else answer
                    prompt_tokens = sum(len(m["content"]) // 4 + 4 for m in body["messages"])
                    if body.get("stream"):
                        events = chat_completion_events(body.get("model", "scripted"), text, finish, prompt_tokens)
                        writer.write(stream_head() + b"".join(http_chunk(e) for e in events) + http_chunk(b""))
                    else:
                        payload = chat_completion_body(body.get("model", "scripted"), text, finish, prompt_tokens)
                        writer.write(http_response(200, json.dumps(payload).encode()))
                elif method == "POST" and path.endswith("/completions") and self.completions is not None:
                    answer = self.completions(json.loads(raw))
                    status, payload = (
                        (answer.status, {"error": {"message": answer.message}})
                        if isinstance(answer, ErrorReply)
                        else (200, answer)
                    )
                    writer.write(http_response(status, json.dumps(payload).encode()))
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


def _token_name(token: int) -> str:
    """A token as ``return_tokens_as_token_ids`` makes vLLM and SGLang write it."""
    return f"token_id:{token}"


class ForcedTeacher:
    """A real causal LM answering with scripted texts: ``script(body)`` gives the text, the model the log-probabilities.

    The model is run over the chat prompt (its tokenizer's template) and the text's tokens plus EOS (teacher forcing):
    row ``t`` is the model's own distribution before token ``t``, the one a sampler at temperature 1 would have drawn
    it from, as vLLM's raw log-probabilities are. As vLLM 0.32 does, the sampled token takes the ``K``-th place when
    it is outside the top ``K``, tokens come as ``token_id:N`` and ``max_tokens`` cuts the answer (finish
    ``length``). The answer is one JSON body, never streamed: run the client with ``teacher.stream: false``.
    :meth:`completions` answers the echo that :func:`kd_core.served.check_tokenizer` sends."""

    def __init__(self, model: Any, tokenizer: Any, script: Callable[[dict[str, Any]], str]) -> None:
        self.model, self.tokenizer, self.script = model.eval(), tokenizer, script

    def chat(self, body: dict[str, Any]) -> str | dict[str, Any]:
        text = self.script(body)
        if not body.get("logprobs"):
            return text
        import torch

        tok = self.tokenizer
        prompt = tok(tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False))
        prompt_ids = list(prompt["input_ids"])
        ids = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        finish = "stop"
        if len(ids) > body.get("max_tokens", len(ids)):
            ids, finish = ids[: body["max_tokens"]], "length"
        text = tok.decode(ids, skip_special_tokens=True)
        with torch.no_grad():
            logits = self.model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        k = int(body.get("top_logprobs") or 1)
        content = []
        for t, token in enumerate(ids):
            top = logp[t].topk(k).indices.tolist()
            if token not in top:
                top[-1] = token
            entries = [{"token": _token_name(i), "logprob": float(logp[t, i])} for i in top]
            content.append({"token": _token_name(token), "logprob": float(logp[t, token]), "top_logprobs": entries})
        body_out = chat_completion_body(body.get("model", "forced"), text, finish, len(prompt_ids))
        body_out["choices"][0]["logprobs"] = {"content": content}
        body_out["usage"]["completion_tokens"] = len(ids)
        return body_out

    def completions(self, body: dict[str, Any]) -> dict[str, Any] | ErrorReply:
        """An echoed prompt's token ids plus one generated token (the tokenizer check); nothing else."""
        if not (body.get("echo") and isinstance(body.get("prompt"), str)):
            return ErrorReply(400, "this test server only echoes text prompts")
        import torch

        ids = list(self.tokenizer(body["prompt"])["input_ids"])
        with torch.no_grad():
            ids.append(int(self.model(torch.tensor([ids])).logits[0, -1].argmax()))
        choice = {"index": 0, "text": body["prompt"], "finish_reason": "length"}
        choice["logprobs"] = {"tokens": [_token_name(i) for i in ids]}
        return {"choices": [choice], "usage": {"prompt_tokens": len(ids) - 1, "completion_tokens": 1}}

    def serve(self) -> ScriptedServer:
        """A started :class:`ScriptedServer` answering chat completions and echoes from this teacher."""
        return ScriptedServer(self.chat, completions=self.completions).start()


def echo_responder(body: dict[str, Any]) -> str:
    """Answers with a short text derived from the last message (deterministic)."""
    return "echo: " + body["messages"][-1]["content"][:64]


def main() -> None:
    """``python -m data_gen.testing --latency 0.2``: serve echo answers on a free port; prints the port, runs until
    killed."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    server = ScriptedServer(echo_responder, latency_s=args.latency).start()
    print(server.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
