"""A fault proxy for exercising the engine against a real server (``transformers serve``) on 127.0.0.1.

:class:`FaultProxy` forwards to a real server and injects, per request, a fault from a schedule: 429 with
``Retry-After``, 500, a hang past the client timeout, malformed JSON, a body cut mid-transfer, or an answer truncated
to ``finish_reason="length"`` (streamed answers too). With ``serial=True`` and ``token_delay_s`` it turns a fast
server into a slow one that answers one request at a time, as a CPU ``transformers serve`` does, and counts the time
it spends on answers nobody received. Its pace is its own clock: token k of an answer is due k x ``token_delay_s``
after the answer started, however long the real server took to produce it, so an answer costs the same on a busy
machine as on an idle one (while the server keeps ahead).

It runs on a private event loop in a background thread, as :class:`data_gen.testing.ScriptedServer` does, with
whose HTTP pieces it is built.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from data_gen.testing import (
    ThreadedServer,
    http_chunk,
    http_response,
    messages_hash,
    read_http_request,
    sse_event,
    stream_head,
)

FAULTS = ("429", "500", "hang", "malformed", "cut", "length")


class FaultProxy(ThreadedServer):
    """Forwards to ``upstream`` (host, port); the n-th chat request suffers ``schedule[n]`` (None = pass through).

    ``serial=True``: one chat request reaches the upstream at a time, the others wait in a queue, as in a server with
    one generation thread; ``token_delay_s``: each answer token costs that long, inside that one slot, counted from
    the answer's start (the upstream's own time is absorbed, not added: see the module docstring). A streamed
    answer's client hanging up ends its work at once (a queued one is dropped before it starts), which is what
    transformers serve 5.24 does with streamed requests (``DirectStreamer.cancel`` on disconnect); a plain JSON
    answer is generated to the end whether anyone still waits for it or not, as transformers serve does too.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        schedule: list[str | None],
        hang_s: float = 30.0,
        retry_after_s: float = 1.0,
        *,
        serial: bool = False,
        token_delay_s: float = 0.0,
    ) -> None:
        super().__init__()
        unknown = [f for f in schedule if f is not None and f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {FAULTS}")
        self.upstream = upstream
        self.schedule = list(schedule)
        self.hang_s = hang_s
        self.retry_after_s = retry_after_s
        self.serial = serial
        self.token_delay_s = token_delay_s
        self.injected: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()  # chat requests that reached the upstream, per messages-hash
        self.completed = 0  # chat answers delivered whole
        self.abandoned = 0  # chat answers the upstream worked on whose client hung up before the end
        self.skipped = 0  # chat requests whose client hung up while they queued (serial): never started
        self.busy_s = 0.0  # seconds the upstream worked on chat requests (the serial slot was held)
        self.wasted_s = 0.0  # of which on answers nobody received
        self._n = 0  # chat requests received
        self._slot = asyncio.Lock()

    @property
    def received(self) -> int:
        """Chat requests received from clients (faults included)."""
        return self._n

    @property
    def backlog(self) -> int:
        """Chat requests received and not yet answered, abandoned, dropped or faulted."""
        return self._n - sum(self.injected.values()) - self.completed - self.abandoned - self.skipped

    async def _upstream(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
        """Sends the request upstream; returns the connection with the status and headers of the answer."""
        reader, writer = await asyncio.open_connection(*self.upstream)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.upstream[0]}:{self.upstream[1]}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        for name in ("authorization",):
            if name in headers:
                head += f"{name}: {headers[name]}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        answer_headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                answer_headers[name.strip().lower()] = value.strip()
        return reader, writer, int(lines[0].split(" ", 2)[1]), answer_headers

    @staticmethod
    async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
        """The answer's body in the pieces it arrives in (chunked encoding decoded)."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                yield await reader.readexactly(size)
                await reader.readexactly(2)
        elif "content-length" in headers:
            yield await reader.readexactly(int(headers["content-length"]))
        else:
            yield await reader.read()

    async def _events(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
        """The server-sent events of a streamed answer, one at a time (``data: ...\\n\\n``)."""
        buffer = b""
        async for piece in self._body(reader, headers):
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.strip():
                    yield event + b"\n\n"

    async def _chat(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: str,
        headers: dict[str, str],
        body: bytes,
        fault: str | None,
    ) -> None:
        """A chat request passed upstream: queued for the serial slot, slowed per token, maybe damaged."""
        gone = asyncio.ensure_future(reader.read())  # the client sends nothing more: this ends when it hangs up
        try:
            if self.serial and not json.loads(body).get("stream"):
                await self._slot.acquire()  # a plain request queued is generated, whoever still waits for it
            elif self.serial:
                acquire = asyncio.ensure_future(self._slot.acquire())
                await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not acquire.done():  # a streamed one whose client left is dropped before it starts
                    acquire.cancel()
                    self.skipped += 1
                    return
            started = time.monotonic()
            delivered = False
            try:
                self.forwarded[messages_hash(json.loads(body))] += 1
                up_reader, up_writer, status, up_headers = await self._upstream("POST", path, headers, body)
                try:
                    if up_headers.get("content-type", "").startswith("text/event-stream"):
                        delivered = await self._relay_stream(writer, up_reader, up_headers, fault, gone, started)
                    else:
                        delivered = await self._relay_json(writer, up_reader, up_headers, status, fault, gone, started)
                finally:
                    up_writer.close()  # also what tells the upstream that nobody listens any more
            finally:
                spent = time.monotonic() - started
                self.busy_s += spent
                if delivered:
                    self.completed += 1
                else:
                    self.abandoned += 1
                    self.wasted_s += spent
                if self.serial:
                    self._slot.release()
        finally:
            gone.cancel()

    async def _relay_stream(
        self,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_headers: dict[str, str],
        fault: str | None,
        gone: asyncio.Future[bytes],
        started: float,
    ) -> bool:
        """Forwards the events (token k at ``started`` + k x ``token_delay_s``); whether the client received them all.
        The client hanging up ends the relay at once, even while the upstream is silent (still queued, or thinking)."""
        writer.write(stream_head(keep_alive=False))
        if fault in ("cut", "length"):
            events = [e async for e in self._events(up_reader, up_headers)]
            if fault == "cut":  # half the events, then hang up mid-body
                writer.write(b"".join(http_chunk(e) for e in events[: len(events) // 2]))
                await writer.drain()
                return False
            source = _aiter_list(_truncate_events(events))
        else:
            source = self._events(up_reader, up_headers)
        paid = 0  # tokens whose delay was served; the usage chunk tells how many there were in all
        while True:
            following = asyncio.ensure_future(anext(source, None))
            await asyncio.wait({following, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                return False
            event = following.result()
            if event is None:
                break
            if self.token_delay_s:
                # One delay per content chunk; at the usage chunk, the rest (a token that decodes to no text yet,
                # part of a UTF-8 character, sends no chunk), so a streamed answer costs what a plain one does.
                owed = 1 if b'"content"' in event else 0
                if b'"completion_tokens"' in event:
                    usage = json.loads(event.decode()[len("data: ") :]).get("usage") or {}
                    owed = max(owed, (usage.get("completion_tokens") or 0) - paid)
                paid += owed
                if owed:  # due on the proxy's clock; the wait ends early when nobody waits any more
                    due = started + paid * self.token_delay_s
                    await asyncio.wait({gone}, timeout=max(0.0, due - time.monotonic()))
            if gone.done():
                return False
            writer.write(http_chunk(event))
            await writer.drain()
        writer.write(http_chunk(b""))
        await writer.drain()
        return not gone.done()

    async def _relay_json(
        self,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_headers: dict[str, str],
        status: int,
        fault: str | None,
        gone: asyncio.Future[bytes],
        started: float,
    ) -> bool:
        """Forwards a plain answer once generated: at ``started`` + ``token_delay_s`` per completion token, client or
        not."""
        payload = b"".join([piece async for piece in self._body(up_reader, up_headers)])
        if self.token_delay_s and status == 200:
            tokens = (json.loads(payload).get("usage") or {}).get("completion_tokens") or 0
            await asyncio.sleep(max(0.0, started + self.token_delay_s * tokens - time.monotonic()))
        answer = http_response(status, payload, keep_alive=False)
        if fault == "cut":  # promise the full body, send half, hang up
            head, _, rest = answer.partition(b"\r\n\r\n")
            answer = head + b"\r\n\r\n" + rest[: len(rest) // 2]
        elif fault == "length":
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"] or ""
            data["choices"][0]["message"]["content"] = content[: len(content) // 2]
            data["choices"][0]["finish_reason"] = "length"
            answer = http_response(200, json.dumps(data).encode(), keep_alive=False)
        if gone.done():
            return False
        writer.write(answer)
        await writer.drain()
        return fault != "cut"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            request = await read_http_request(reader)
            if request is None:
                return
            method, path, headers, body = request
            if not path.endswith("/chat/completions"):
                up_reader, up_writer, status, up_headers = await self._upstream(method, path, headers, body)
                payload = b"".join([piece async for piece in self._body(up_reader, up_headers)])
                up_writer.close()
                writer.write(http_response(status, payload, keep_alive=False))
                await writer.drain()
                return
            fault = self.schedule[self._n] if self._n < len(self.schedule) else None
            self._n += 1
            if fault is not None:
                self.injected[fault] += 1
            if fault == "429":
                writer.write(
                    http_response(
                        429,
                        b'{"error":{"message":"slow down"}}',
                        {"Retry-After": str(self.retry_after_s)},
                        keep_alive=False,
                    )
                )
            elif fault == "500":
                writer.write(http_response(500, b'{"error":{"message":"boom"}}', keep_alive=False))
            elif fault == "hang":  # say nothing until the client gives up (closes) or hang_s passes
                try:
                    await asyncio.wait_for(reader.read(), self.hang_s)
                except asyncio.TimeoutError:
                    pass
            elif fault == "malformed":
                if json.loads(body).get("stream"):
                    writer.write(
                        stream_head(keep_alive=False)
                        + http_chunk(b'data: {"id": "x", "choices": [\n\n')
                        + http_chunk(b"")
                    )
                else:
                    writer.write(http_response(200, b'{"id": "x", "choices": [', keep_alive=False))
            else:
                await self._chat(reader, writer, path, headers, body, fault)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # stop() while queued; not re-raised: asyncio 3.11's stream callback
            pass  # calls task.exception() on its handler task, which raises on a cancelled one
        finally:
            self._writers.discard(writer)
            writer.close()


async def _aiter_list(items: list[bytes]) -> Any:
    for item in items:
        yield item


def _truncate_events(events: list[bytes]) -> list[bytes]:
    """A streamed answer cut to half its content events, its finish chunk saying ``length``."""
    content = [i for i, e in enumerate(events) if b'"content"' in e]
    drop = set(content[max(1, len(content) // 2) :])
    out = []
    for i, event in enumerate(events):
        if i in drop:
            continue
        text = event.decode()[len("data: ") :].strip()
        if text != "[DONE]":
            data = json.loads(text)
            for choice in data.get("choices") or ():
                if choice.get("finish_reason"):
                    choice["finish_reason"] = "length"
            event = sse_event(data)
        out.append(event)
    return out
