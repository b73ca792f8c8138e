"""The teacher engine every generation pipeline runs on.

A pipeline builds :class:`Request` objects with stable ids and hands them to :meth:`Engine.run` (results in
completion order, an async iterator) or :meth:`Engine.map` (results in request order; sharded across processes under
``accelerate launch``). For each request the engine:

1. looks the call up in the answer cache (model + messages + decoding + sample index): a hit costs nothing;
2. otherwise reserves its worst-case cost against ``max_cost_usd`` (and stops cleanly when it would not fit),
   waits for the rate limiter (requests and tokens per minute, global ``Retry-After`` pauses) and a concurrency slot
   (an adaptive limit that halves on timeouts, 429/503/504 and signs of queueing at the server, and grows back while
   answers come in time: :class:`kd_core.limiter.AdaptiveConcurrency`);
3. calls the backend, retrying transient failures with full-jitter exponential backoff; a request still failing
   after ``max_retries`` stops the run with :class:`EngineError` (everything already saved stays saved), whose
   message is scrubbed of the API key and of URL credentials (:meth:`Engine.scrub`) because servers echo them;
4. stores the answer in the cache *before* anything else, so a paid answer is never lost;
5. runs the pipeline's ``parse(text, finish_reason)``; a :class:`ParseError` triggers another call (at most
   ``max_parse_retries``), each retry cached under its own attempt number so a rerun replays the same sequence.

Pipelines append their records to a :class:`data_gen.journal.Journal` and call :meth:`Engine.reject` for records
they filter out, which shows up in the progress bar and the summary.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from data_gen.backends import ApiBackend, Completion, LocalBackend, estimate_tokens
from data_gen.cache import AnswerCache, cache_key
from data_gen.calls import (
    BudgetError,  # noqa: F401 (the driver and pipelines import it from here, with the rest of this vocabulary)
    CallPlan,
    EngineError,
    ParseError,
    ParseFn,
    Request,
    Result,
    Stats,
    preflight,
)
from data_gen.config import TeacherConfig
from data_gen.logprobs import TokenLogprobs
from kd_core.commands import INTERRUPTED
from kd_core.limiter import AdaptiveConcurrency, RateLimiter
from kd_core.redact import scrub, url_secrets
from kd_core.retry import Attempt, RetriesExhausted, RetryPolicy, call_with_retries
from kd_core.served_limits import Budget


class Engine:
    """Runs requests against one teacher with caching, limits, retries, cost accounting and a progress bar."""

    def __init__(self, cfg: TeacherConfig, cache: AnswerCache, backend: Any, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.cache = cache
        self.backend = backend
        self.show_progress = progress
        self.stats = Stats()
        self.stopped: str | None = None  # 'budget' or 'interrupted' once the engine stops taking new calls
        self.limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        # The local backend batches whatever is in flight: its concurrency stays at in_flight.
        self.concurrency = AdaptiveConcurrency(
            cfg.in_flight,
            cfg.min_concurrency,
            adaptive=cfg.adaptive_concurrency and cfg.backend == "api",
            latency_factor=cfg.queue_latency_factor,
        )
        self._bar: tqdm | None = None
        self._started = time.time()
        self.rank, self.world = _process_rank()
        # Each process of a sharded run gets an equal share of the budget, so the total cap holds without a
        # cross-process lock on every call.
        share = None if cfg.max_cost_usd is None else cfg.max_cost_usd / self.world
        self.budget = Budget(cfg.price_input_per_m, cfg.price_output_per_m, share)
        self.secrets = teacher_secrets(cfg)

    # ---------------------------------------------------------------------------------------------- cost
    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return self.budget.cost(input_tokens, output_tokens)

    def params_for(self, request: Request) -> dict[str, Any]:
        d = self.cfg.decoding
        params = {
            "temperature": d.temperature,
            "top_p": d.top_p,
            "max_tokens": d.max_tokens,
            "stop": d.stop,
            "seed": d.seed,
        }
        if d.generation_kwargs:  # only when set, so the cache keys of earlier runs stay valid
            params["generation_kwargs"] = d.generation_kwargs
        if self.cfg.logprobs:  # likewise; and an answer cached without log-probabilities is never taken for one with
            params["logprobs"] = self.cfg.logprobs
        params.update(request.decoding)
        return params

    def scrub(self, text: str) -> str:
        """``text`` without the API key or the URL's credentials: every error the engine reports passes here, since
        servers echo keys back (``invalid api key sk-...``) and error messages quote URLs."""
        return scrub(text, self.secrets)

    def preflight(self, plan: list[CallPlan]) -> float:
        """See :func:`preflight` (printed on the main process only)."""
        return preflight(self.cfg, plan, quiet=self.rank != 0)

    # ---------------------------------------------------------------------------------------------- control
    def stop(self, reason: str) -> None:
        """Stop taking new calls; calls in flight finish and are saved."""
        if self.stopped is None:
            self.stopped = reason

    def install_signal_handlers(self) -> None:
        """Ctrl-C / SIGTERM: stop gracefully the first time (paid calls in flight are saved); a second Ctrl-C
        interrupts at once."""
        loop = asyncio.get_running_loop()

        def handle(signum: int) -> None:
            if self.stopped == INTERRUPTED and signum == signal.SIGINT:
                raise KeyboardInterrupt
            print(f"\n{signal.Signals(signum).name}: finishing calls in flight, then stopping", flush=True)
            # Ctrl-C exits 130 as every command does (kd_core.commands.stop_code); SIGTERM (a scheduler) exits 3.
            self.stop(INTERRUPTED if signum == signal.SIGINT else "terminated")

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, handle, signum)

    def reject(self, reason: str, n: int = 1) -> None:
        """Count ``n`` records a pipeline filtered out for ``reason``."""
        self.stats.rejections[reason] += n
        self._refresh_bar()

    # ---------------------------------------------------------------------------------------------- progress
    def open_progress(self, total: int | None, desc: str, unit: str = "rec", initial: int = 0) -> None:
        """A bar the pipeline advances with :meth:`advance`; the engine keeps its cost/rejection postfix current."""
        self.close_progress()
        if self.show_progress and self.rank == 0:
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._refresh_bar()

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _refresh_bar(self) -> None:
        if self._bar is None:
            return
        postfix = {"cost": f"${self.stats.cost_usd:.4f}", "calls": self.stats.calls, "cached": self.stats.cached}
        for reason, n in self.stats.rejections.most_common(4):
            postfix[reason] = n
        self._bar.set_postfix(postfix, refresh=False)

    def summary(self) -> str:
        s = self.stats
        elapsed = time.time() - self._started
        lines = [
            f"teacher calls: {s.calls} new, {s.cached} from cache; retries: {dict(s.retries) or 0}",
            f"tokens: {s.input_tokens} in, {s.output_tokens} out; cost: ${s.cost_usd:.4f}; "
            f"truncated answers (finish_reason=length): {s.truncated}; elapsed {elapsed:.1f}s",
            f"rejections: {dict(s.rejections) or 0}",
        ]
        c = self.concurrency
        if c.adaptive:
            lines.append(
                f"concurrency: {c.current} in flight at the end (between {int(c.lowest)} and "
                f"{min(c.maximum, int(c.highest))} of at most {c.maximum}; halved {c.decreases} times)"
            )
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------------- running
    async def run(self, requests: Iterable[Request], parse: ParseFn | None = None) -> AsyncIterator[Result]:
        """Results in completion order. Stops scheduling when :attr:`stopped` is set; in-flight calls finish."""
        pending: set[asyncio.Task[Result | None]] = set()
        # Finished tasks arrive through a queue: O(1) per completion, where asyncio.wait(pending) would re-register
        # callbacks on every pending task each time (O(concurrency) per call, visible at hundreds of calls/s).
        finished: asyncio.Queue[asyncio.Task[Result | None]] = asyncio.Queue()
        iterator = iter(requests)
        exhausted = False
        try:
            while pending or not exhausted:
                # Keep a little more than `in_flight` tasks alive: cache hits finish without taking a slot.
                while not exhausted and self.stopped is None and len(pending) < 2 * self.cfg.in_flight:
                    request = next(iterator, None)
                    if request is None:
                        exhausted = True
                        break
                    task = asyncio.create_task(self._process(request, parse))
                    task.add_done_callback(finished.put_nowait)
                    pending.add(task)
                if self.stopped is not None:
                    exhausted = True
                if not pending:
                    break
                task = await finished.get()
                pending.discard(task)
                result = task.result()  # re-raises EngineError: the `finally` cancels the rest
                if result is not None:
                    yield result
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def map(self, requests: list[Request], parse: ParseFn | None = None) -> list[Result | None]:
        """Results in request order (None where the engine stopped first).

        Under ``accelerate launch`` each process answers the requests whose index is congruent to its rank, then
        every process receives all results (``all_gather_object``), so pipelines stay identical on every rank.
        """
        mine = [(i, r) for i, r in enumerate(requests) if i % self.world == self.rank]
        index = {id(r): i for i, r in mine}
        results: list[Result | None] = [None] * len(requests)
        async for result in self.run([r for _, r in mine], parse):
            results[index[id(result.request)]] = result
        if self.world > 1:
            import torch.distributed as dist

            # torch's all_gather_object directly: accelerate 1.15's gather_object is a no-op when it classifies a
            # gloo CPU group as DistributedType.NO.
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, [(i, results[i]) for i, _ in mine])
            for part in gathered:
                for i, result in part:
                    results[i] = result
        return results

    async def _process(self, request: Request, parse: ParseFn | None) -> Result | None:
        parse = request.parse or parse
        params = self.params_for(request)
        started = time.time()
        # The key leaves out base_url, and with it any credentials in it: the same model answering the same call is
        # the same answer, so the cache still hits after a password rotation or through another proxy, and
        # cache.sqlite holds no trace of the credentials.
        base_key = cache_key(self.cfg.model, request.messages, params, request.sample)
        result = Result(request, None, None, params=params, started=started)
        for attempt in range(self.cfg.max_parse_retries + 1):
            # Retry k is cached under its own key, so a rerun replays the same answers in the same order.
            key = base_key if attempt == 0 else f"{base_key}#parse-retry-{attempt}"
            completion = await self._answer(request, params, key, result)
            if completion is None:
                return None  # stopped before this call could be made
            result.text, result.finish_reason = completion.text, completion.finish_reason
            if completion.logprobs is not None:  # the cached answer's key: where the store finds its log-probs
                result.token_ids, result.logprobs_key = completion.logprobs.token_ids.tolist(), key
            if completion.finish_reason == "length":
                self.stats.truncated += 1
            if parse is None:
                break
            try:
                result.parsed = parse(completion.text, completion.finish_reason)
                result.error = None
                break
            except ParseError as err:
                result.error = f"parse:{err.reason}"
                self.stats.retries[f"parse:{err.reason}"] += 1
        if result.error is not None:
            self.stats.rejections[result.error] += 1
        result.finished = time.time()
        self._refresh_bar()
        return result

    async def _answer(self, request: Request, params: dict[str, Any], key: str, result: Result) -> Completion | None:
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cached += 1
            result.cached = True
            logprobs = TokenLogprobs.from_bytes(hit.logprobs) if hit.logprobs is not None else None
            return Completion(hit.text, hit.finish_reason, hit.input_tokens, hit.output_tokens, logprobs=logprobs)
        result.cached = False
        est_in = estimate_tokens(request.messages)
        if self.stopped is not None:
            return None
        reservation = self.budget.reserve(est_in, params["max_tokens"])
        if reservation is None:
            self.stop("budget")
            return None
        try:
            completion = await self._call_with_retries(request, params, est_in)
        finally:
            self.budget.release(reservation)
        # The answer is paid for: persist it before anything can go wrong downstream.
        logprobs = completion.logprobs.to_bytes() if completion.logprobs is not None else None
        self.cache.put(
            key, completion.text, completion.finish_reason, completion.input_tokens, completion.output_tokens, logprobs
        )
        cost = self.budget.charge(completion.input_tokens, completion.output_tokens)
        self.stats.calls += 1
        self.stats.input_tokens += completion.input_tokens
        self.stats.output_tokens += completion.output_tokens
        self.stats.cost_usd += cost
        result.attempts += 1
        result.input_tokens += completion.input_tokens
        result.output_tokens += completion.output_tokens
        result.cost_usd += cost
        return completion

    def _count_retry(self, reason: str) -> None:
        self.stats.retries[reason] += 1

    async def _call_with_retries(self, request: Request, params: dict[str, Any], est_in: int) -> Completion:
        async def attempt(first_token) -> Attempt[Completion]:
            completion = await self.backend.complete(request.messages, params, first_token)
            used = completion.input_tokens + completion.output_tokens
            return Attempt(completion, used, completion.first_token_s)

        policy = RetryPolicy(self.cfg.max_retries, self.cfg.backoff_base_s, self.cfg.backoff_max_s)
        try:
            return await call_with_retries(
                attempt,
                policy=policy,
                limiter=self.limiter,
                concurrency=self.concurrency,
                tokens=est_in + params["max_tokens"],
                on_retry=self._count_retry,
            )
        except RetriesExhausted as err:
            if err.fatal:
                raise EngineError(self.scrub(f"request {request.id}: {err}")) from None
            where = self.cfg.base_url or "the OpenAI API"
            raise EngineError(
                self.scrub(
                    f"teacher at {where} failed request {request.id} {self.cfg.max_retries + 1} times "
                    f"(last: {err.last}); everything saved so far is kept, rerun to resume"
                )
            ) from None

    async def aclose(self) -> None:
        self.close_progress()
        await self.backend.aclose()
        self.cache.close()


def teacher_secrets(cfg: TeacherConfig) -> list[str]:
    """What must never be printed or stored: the key in ``$<api_key_env>``, the credentials in ``base_url`` and the
    values of the configured headers."""
    import os

    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return [s for s in (key, *url_secrets(cfg.base_url), *cfg.headers.values()) if s]


def _process_rank() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch``; (0, 1) for a plain process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    from accelerate import PartialState

    # Initialises the process group that gather_object needs. Without CUDA, accelerate 1.15 only sees the other
    # processes when told to use gloo (otherwise every rank believes it is alone).
    state = PartialState(backend=None if torch.cuda.is_available() else "gloo")
    return state.process_index, state.num_processes


def build_engine(cfg: TeacherConfig, output_dir: str | Path, *, progress: bool = True) -> Engine:
    """An engine with the configured backend and the cache at ``cfg.cache_path`` or ``<output_dir>/cache.sqlite``."""
    if cfg.backend == "api":
        backend: Any = ApiBackend(cfg)
    else:
        device = cfg.device
        rank, world = _process_rank()
        if device == "cuda" and world > 1:
            device = f"cuda:{rank % max(1, _cuda_count())}"
        backend = LocalBackend(cfg, device)
    # Created after the backend, so a missing API key or model directory leaves nothing on disk.
    cache = AnswerCache(cfg.cache_path or Path(output_dir) / "cache.sqlite")
    return Engine(cfg, cache, backend, progress=progress)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()
