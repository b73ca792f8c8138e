"""The two teacher backends behind one coroutine: ``await backend.complete(messages, params) -> Completion``
(optionally ``on_first_token``, called when a streamed answer's first token arrives: the adaptive concurrency
limit reads it as "this call is not queued at the server").

* :class:`ApiBackend`: the ``openai`` async client against OpenAI or any OpenAI-compatible server (vLLM, TGI,
  ``transformers serve``). The client's own retries are disabled: the engine retries, so that one limiter sees
  every attempt and ``Retry-After`` pauses all workers, not just the one that was told. Answers are streamed by
  default: a call that times out or is cancelled closes its connection, which makes the server stop generating it
  (instead of finishing an answer nobody waits for while the retry queues behind it), and the timeout bounds the
  wait for each chunk, so a long answer that is progressing is never cut.
* :class:`LocalBackend`: a transformers causal LM. Concurrent calls are queued and answered in batches: prompts
  are sorted by length (length bucketing, so little padding is generated), left-padded, and generated together
  (:mod:`kd_core.generation`, the loop ``distill eval`` uses too).

Errors are normalised: :class:`TransientError` (retry with backoff) or :class:`FatalError` (stop the run).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data_gen.config import TeacherConfig
from data_gen.logprobs import TokenLogprobs, parse_content, request_fields
from kd_core.config import ConfigError
from kd_core.generation import encode_prompt, generate_batched
from kd_core.remote import FatalError, TransientError, openai_errors, resolve_api_key, split_query


@dataclass
class Completion:
    """One answer with the token counts used for cost accounting."""

    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    first_token_s: float | None = None  # seconds from sending to the first token, when the answer was streamed
    logprobs: TokenLogprobs | None = None  # with teacher.logprobs: the generated ids and their top-K


CONNECTIONS_PER_CLIENT = 8


class ApiBackend:
    """Chat completions through ``openai.AsyncOpenAI`` (openai 3.57; ``max_retries=0`` so we own retries)."""

    def __init__(self, cfg: TeacherConfig) -> None:
        import openai

        self._openai = openai
        self.model = cfg.model
        self.stream = cfg.stream
        key = resolve_api_key(cfg.api_key_env)
        # With stream=True the client's timeout is httpx's per-read timeout (openai 3.57 / httpx2 2.16): the longest
        # silence between two chunks, the wait for the first token included.
        # Several clients, used in turn: httpcore scans its whole connection pool on every request, so one pool of
        # 64 connections costs O(64) socket checks per call; pools of CONNECTIONS_PER_CLIENT keep that flat.
        n_clients = max(1, -(-cfg.concurrency // CONNECTIONS_PER_CLIENT))
        base_url, query = split_query(cfg.base_url)
        self.clients = [
            openai.AsyncOpenAI(
                api_key=key,
                base_url=base_url,
                timeout=cfg.timeout_s,
                max_retries=0,
                default_headers=cfg.headers or None,
                default_query=query or None,
            )
            for _ in range(n_clients)
        ]
        self._next = 0

    @property
    def client(self) -> Any:
        """The first client (all share key, URL and timeout)."""
        return self.clients[0]

    async def complete(
        self, messages: list[dict[str, str]], params: dict[str, Any], on_first_token: Callable[[], None] | None = None
    ) -> Completion:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": params["temperature"],
            "top_p": params["top_p"],
            "max_tokens": params["max_tokens"],
        }
        if params.get("stop"):
            kwargs["stop"] = params["stop"]
        if params.get("seed") is not None:
            kwargs["seed"] = params["seed"]
        if params.get("logprobs"):
            kwargs.update(request_fields(params["logprobs"]))
        client = self.clients[self._next % len(self.clients)]
        self._next += 1
        started = time.monotonic()
        first_token_s = None
        content: list[Any] = []  # the answer's logprobs.content entries (every chunk's, when streamed)
        with openai_errors():
            if self.stream:
                text, finish_reason, usage, first_token_s = await self._stream(
                    client, kwargs, started, on_first_token, content
                )
            else:
                # client.post is the openai client's documented way to call an endpoint with a ready body; auth,
                # timeouts and status-code errors stay the client's. With cast_to=dict it skips the recursive
                # TypedDict transform of create() and the pydantic construction of the answer (~2 ms of CPU per call
                # together in openai 3.54, which held a 64-way run well under 300 calls/s on one core); we read the
                # few fields we need ourselves, checking them.
                response = await client.post("/chat/completions", body=kwargs, cast_to=dict)
                text, finish_reason, usage = _read_answer(response)
                content = ((response["choices"][0].get("logprobs") or {}).get("content")) or []
        logprobs = parse_content(content, params["logprobs"]) if params.get("logprobs") else None
        input_tokens = usage.get("prompt_tokens") or estimate_tokens(messages)
        output_tokens = usage.get("completion_tokens") or estimate_text_tokens(text)
        return Completion(text, finish_reason, int(input_tokens), int(output_tokens), first_token_s, logprobs)

    async def _stream(
        self,
        client: Any,
        kwargs: dict[str, Any],
        started: float,
        on_first_token: Callable[[], None] | None,
        content: list[Any],
    ) -> tuple[str, str, dict[str, Any], float | None]:
        """(text, finish_reason, usage, seconds to the first token) of a streamed answer; the chunks'
        ``logprobs.content`` entries (asked for with teacher.logprobs) are appended to ``content``.

        Leaving this coroutine in any way (timeout, cancellation, error) closes the response, hence the connection:
        transformers serve 5.24 (starlette 1.10 listens for http.disconnect under uvicorn's ASGI 2.3) then cancels
        the generation, also one still waiting in its queue.
        """
        body = {**kwargs, "stream": True, "stream_options": {"include_usage": True}}  # usage: OpenAI, vLLM
        stream = await client.post(
            "/chat/completions", body=body, cast_to=object, stream=True, stream_cls=self._openai.AsyncStream[object]
        )
        parts: list[str] = []
        finish_reason = None
        usage: dict[str, Any] = {}
        first_token_s = None
        async with stream:
            async for chunk in stream:
                if not isinstance(chunk, dict):
                    raise ValueError(f"stream chunk is not an object: {str(chunk)[:200]}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    content.extend((choice.get("logprobs") or {}).get("content") or ())
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        if first_token_s is None:  # the role-only first chunk says nothing about the queue
                            first_token_s = time.monotonic() - started
                            if on_first_token is not None:
                                on_first_token()
                        parts.append(delta)
                    finish_reason = choice.get("finish_reason") or finish_reason
        if finish_reason is None:  # the stream ended without the final chunk: the connection was cut
            raise self._openai.APIConnectionError(
                message="the stream ended before the answer did", request=stream.response.request
            )
        return "".join(parts), finish_reason, usage, first_token_s

    async def aclose(self) -> None:
        for client in self.clients:
            await client.close()


def _read_answer(response: Any) -> tuple[str, str, dict[str, Any]]:
    """(text, finish_reason, usage) of a chat completion body, or TransientError('malformed')."""
    try:
        choice = response["choices"][0]
        text = choice["message"]["content"]
        finish_reason = choice.get("finish_reason") or "stop"
        usage = response.get("usage") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        raise TransientError("malformed", f"answer without choices/message: {str(response)[:200]}") from None
    if not isinstance(text, str):
        raise TransientError("malformed", "answer without text content")
    return text, finish_reason, usage


def estimate_text_tokens(text: str) -> int:
    """About 4 characters per token for English BPE vocabularies (used only where the server reports no usage)."""
    return max(1, len(text) // 4)


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    """Prompt tokens of a chat, with a few tokens of template overhead per message."""
    return sum(estimate_text_tokens(m["content"]) + 4 for m in messages)


# The local backend's batching window (:meth:`LocalBackend._gather`): short against one generation (seconds), long
# against the event-loop turns between one answer and its caller's next call (milliseconds).
BATCH_WINDOW_S = 0.05
BATCH_WAIT_S = 0.5


class LocalBackend:
    """Batched generation with a local transformers model.

    ``complete`` enqueues the call; one worker task drains the queue, groups calls with equal decoding parameters,
    sorts each group by prompt length and runs ``model.generate`` on slices of ``batch_size`` in a thread (so the
    event loop keeps accepting calls while the model works).
    """

    def __init__(self, cfg: TeacherConfig, device: str | None = None) -> None:
        import torch

        from kd_core.pretrained import load_causal_lm, load_tokenizer

        self.batch_size = cfg.batch_size
        self.device = device or cfg.device
        self.tokenizer = load_tokenizer(cfg.model, "teacher.model")
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"teacher.model: {cfg.model} has no chat_template in its tokenizer")
        if self.tokenizer.pad_token is None:  # batches are padded (kd_core.generation pads on the left)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_causal_lm(cfg.model, "teacher.model", getattr(torch, cfg.dtype))
        self.model.to(self.device).eval()
        self._queue: asyncio.Queue[tuple[list[int], dict[str, Any], asyncio.Future[Completion]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def complete(
        self, messages: list[dict[str, str]], params: dict[str, Any], on_first_token: Callable[[], None] | None = None
    ) -> Completion:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        ids = encode_prompt(self.tokenizer, messages)
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        await self._queue.put((ids, params, future))
        return await future

    async def _gather(self) -> list[tuple[list[int], dict[str, Any], asyncio.Future[Completion]]]:
        """The next calls to batch: the first one to arrive, then every call that follows within
        :data:`BATCH_WINDOW_S` of the previous arrival, until ``batch_size`` are queued or :data:`BATCH_WAIT_S` has
        passed. Callers whose answers came in the same batch take several event-loop turns (parsing, the cache write,
        the journal) to send their next call; a batch cut off at the first turn ran with a third of its rows (5 of 16
        in the real quickstart's ``data-gen cot``) for the seconds a generation takes."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        pending = [await self._queue.get()]
        deadline = loop.time() + BATCH_WAIT_S
        while True:
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            if len(pending) >= self.batch_size or loop.time() >= deadline:
                return pending
            await asyncio.sleep(BATCH_WINDOW_S)
            if self._queue.empty():
                return pending  # nobody else is about to call

    async def _work(self) -> None:
        while True:
            pending = await self._gather()
            groups: dict[str, list[tuple[list[int], dict[str, Any], asyncio.Future[Completion]]]] = {}
            for item in pending:
                # Calls that differ only in their seed share a batch, seeded with its first call's seed: a local
                # answer depends on its batch's other rows anyway (one generator draws for all), and the cache
                # keeps it; cot's samples 0 and 1 of a question carry seeds 0 and 1 and would halve every batch.
                unseeded = {k: v for k, v in item[1].items() if k != "seed"}
                groups.setdefault(json.dumps(unseeded, sort_keys=True), []).append(item)
            for items in groups.values():
                items.sort(key=lambda item: len(item[0]))  # length bucketing
                for start in range(0, len(items), self.batch_size):
                    batch = items[start : start + self.batch_size]
                    try:
                        outputs = await asyncio.to_thread(self._generate, [b[0] for b in batch], batch[0][1])
                    except Exception as err:  # surface model errors to every waiting caller
                        for _, _, future in batch:
                            if not future.done():
                                future.set_exception(FatalError(f"local generation failed: {err}"))
                        continue
                    for (_, _, future), completion in zip(batch, outputs):
                        if not future.done():
                            future.set_result(completion)

    def _generate(self, prompts: list[list[int]], params: dict[str, Any]) -> list[Completion]:
        """One ``model.generate`` call for the whole batch (``_work`` has sliced and length-sorted it)."""
        generations, _ = generate_batched(
            self.model,
            self.tokenizer,
            prompts,
            params["max_tokens"],
            batch_size=len(prompts),
            temperature=params["temperature"],
            top_p=params["top_p"],
            seed=params.get("seed"),
            generation_kwargs=params.get("generation_kwargs"),
        )
        return [
            Completion(g.text, "stop" if g.stopped else "length", g.prompt_tokens, g.new_tokens) for g in generations
        ]

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
