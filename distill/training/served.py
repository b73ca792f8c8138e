"""A served teacher (``model.teacher_url``): an OpenAI-compatible server scores every micro-batch, no teacher weights.

Each row of a micro-batch is sent as token ids (prompt plus completion, up to its last counted label) with
``prompt_logprobs: loss.served_topk`` (:class:`kd_core.served.PromptScorer`); the answer's row ``t`` is the teacher's
top-k after ids ``0..t``, so the rows at the counted positions, in the trainer's row-major order, are a
:class:`~distill.losses.topk.TopKTargets` and every logit term runs the store's top-k plus tail kernel on them
(:class:`~distill.training.teacher.StoreTargets`).

Overlap: :meth:`ServedTeacher.prefetch` sends a micro-batch's rows, all at once, as soon as the step has built it, on
an event loop in a thread of its own; the step goes on sampling the next micro-batches while they are scored, and
:meth:`ServedTeacher.settle` waits, before each micro-batch's forward, for that micro-batch only: the later ones are
scored while the earlier ones run forward and backward. Where the next step's micro-batches are known for certain
(the dataset's own completions: the data stream fixes them), :meth:`ServedTeacher.speculate` sends them while this
step trains, and the next step's :meth:`~ServedTeacher.prefetch` takes the answer of an identical micro-batch (same
samples, same ids) instead of asking again; nothing moves the data position. Every call goes through
:class:`kd_core.served_limits.ServedCalls` (retries, one adaptive concurrency limit and the budget, as precompute).

A server that stays down: ``settle`` is where every rank learns whether every other rank got the micro-batch's
targets (one all-reduce per micro-batch, on every rank: every rank has the step's number of micro-batches), so all
ranks stop together, before the same forward: no optimizer step has happened in the step (it comes at its last
micro-batch), and the trainer drops the step's partial gradients and saves the position the step started from
(:class:`TeacherLost`, :meth:`distill.training.loop.Distiller.guarded_step`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from distill.losses.objective import target_positions
from distill.losses.topk import TopKTargets
from distill.training.teacher import StoreTargets, TeacherSignal
from kd_core.config import ConfigError
from kd_core.redact import redact_urls
from kd_core.retry import Attempt, RetriesExhausted
from kd_core.served import PromptScorer, check_tokenizer
from kd_core.served_limits import ServedCalls, ServedLimits

if TYPE_CHECKING:
    from accelerate import Accelerator

    from distill.training.config import TrainConfig

logger = logging.getLogger("distill")
FIELD = "model.teacher_url"


class TeacherLost(Exception):
    """A rank's scoring failed for good (after its retries); raised on every rank by :meth:`ServedTeacher.settle`."""


Rows = list[tuple[int, list[int], list[int]]]  # per row: sample id, ids to send, counted positions (batch_rows)


class ServedTeacher(TeacherSignal):
    """The teacher behind ``url``; ``k`` log-probabilities per position, ids checked against ``vocab_size``."""

    model = None  # no weights here: held-out teacher figures need a local model
    speculates = True

    def __init__(
        self,
        scorer: PromptScorer,
        k: int,
        vocab_size: int,
        accelerator: Accelerator,
        limits: ServedLimits,
    ) -> None:
        self.scorer = scorer
        self.k = k
        self.vocab_size = vocab_size
        self.accelerator = accelerator
        self.retries = 0
        self.calls = ServedCalls(limits, on_retry=self._count_retry)
        self.pending: dict[int, concurrent.futures.Future] = {}  # this step's micro-batches, by input_ids tensor
        self.speculative: dict[tuple, concurrent.futures.Future] = {}  # the next step's, by their rows
        self.waited = 0.0  # seconds settle waited since the last figures()
        self.loop = asyncio.new_event_loop()  # the openai client's connections live on this loop only
        self.thread = threading.Thread(target=self.loop.run_forever, name="served-teacher", daemon=True)
        self.thread.start()

    @classmethod
    def connect(cls, cfg: TrainConfig, accelerator: Accelerator, tokenizer, vocab_size: int) -> ServedTeacher:
        """The served teacher of ``cfg``, its tokenizer checked against ``tokenizer`` on a probe text before any
        row is scored (ConfigError naming the field: a different tokenizer, or a server that never answered)."""
        m = cfg.model
        scorer = PromptScorer(
            m.teacher_url,
            m.teacher_model,
            api_key_env=m.teacher_api_key_env,
            timeout_s=m.teacher_served.timeout_s,
            field=FIELD,
        )
        teacher = cls(scorer, cfg.loss.served_topk, vocab_size, accelerator, m.teacher_served)

        async def probe(_first_token) -> Attempt[None]:
            await check_tokenizer(scorer, tokenizer, FIELD)
            return Attempt(None, 0)

        try:
            teacher.run(teacher.calls.retrying(probe, tokens=0))
        except RetriesExhausted as err:
            raise ConfigError(f"{FIELD}: {redact_urls(m.teacher_url)} did not answer a probe: {err}") from None
        logger.info("served teacher %s (%s): tokenizer checked", redact_urls(m.teacher_url), m.teacher_model)
        return teacher

    def run(self, coroutine):
        """Runs ``coroutine`` on the teacher's loop and waits for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def _count_retry(self, _reason: str) -> None:
        self.retries += 1

    # -- scoring -----------------------------------------------------------------------------------------------

    def prefetch(self, batch: dict[str, Tensor]) -> None:
        """Starts scoring ``batch``'s rows (all in parallel) in the background, or takes the speculative answer of
        the same rows (one that failed is asked again: the server may be back)."""
        rows = batch_rows(batch)
        future = self.speculative.pop(row_key(rows), None)
        if future is None or (future.done() and future.exception() is not None):
            future = asyncio.run_coroutine_threadsafe(self.score_rows(rows), self.loop)
        self.pending[id(batch["input_ids"])] = future

    def speculate(self, batches: list[dict[str, Tensor]]) -> None:
        """Starts scoring micro-batches a later step will build; the ones the previous call started and no step
        took are dropped (they were paid for: the caller sends only micro-batches that are certain)."""
        self.speculative = {}
        for batch in batches:
            rows = batch_rows(batch)
            self.speculative[row_key(rows)] = asyncio.run_coroutine_threadsafe(self.score_rows(rows), self.loop)

    async def score_rows(self, rows: Rows) -> TopKTargets:
        """The targets of ``rows`` ((sample id, ids to send, counted positions)), concatenated in row order."""
        answers = await asyncio.gather(*(self.score_row(*row) for row in rows), return_exceptions=True)
        failed = next((a for a in answers if isinstance(a, BaseException)), None)
        if failed is not None:
            raise failed
        ids = np.concatenate([a[0] for a in answers])
        logp = np.concatenate([a[1] for a in answers])
        tail = np.concatenate([a[2] for a in answers])
        return TopKTargets(torch.from_numpy(ids), torch.from_numpy(logp), torch.from_numpy(tail))

    async def score_row(self, sample_id: int, ids: list[int], counted: list[int]):
        where = f"{FIELD}: sample {sample_id}"

        if not counted:
            empty = np.empty((0, self.k), dtype=np.int64)
            return empty, empty.astype(np.float32), np.empty(0, dtype=np.float32)
        # A spent budget fails the step like a lost server: saved, exit 3, resumable with a new cap.
        answer = await self.calls.score(self.scorer, ids, self.k, where)
        if answer is None:
            raise RuntimeError(f"model.teacher_served.max_cost_usd ({self.calls.budget.max_cost_usd}) is spent")
        picked = np.asarray(counted)
        top, logp, tail = answer.ids[picked], answer.logprobs[picked], answer.log_tail[picked]
        if top.size and int(top.max()) >= self.vocab_size:
            raise ValueError(
                f"{where}: the server returned token id {int(top.max())}, beyond the student's vocabulary of "
                f"{self.vocab_size} (is it serving a model of the student's family?)"
            )
        return top, logp, tail

    def settle(self, batch: dict[str, Tensor]) -> None:
        """Waits for ``batch``'s targets (prefetched) before its forward; raises :class:`TeacherLost` on every rank
        when any rank's scoring of its micro-batch failed (one all-reduce, made by every rank once per
        micro-batch)."""
        began = time.perf_counter()
        future = self.pending.get(id(batch["input_ids"]))
        failure = future.exception() if future is not None else None
        self.waited += time.perf_counter() - began
        acc = self.accelerator
        flag = torch.tensor([0.0 if failure is None else 1.0], device=acc.device)
        if acc.reduce(flag, "sum").item() > 0:
            self.pending.clear()
            reason = f"failed: {failure}" if failure is not None else "was lost by another process"
            raise TeacherLost(redact_urls(f"{FIELD}: the served teacher {reason}"))

    def figures(self) -> dict[str, float]:
        """The step's figures (this rank's share of the all-rank mean): seconds its forwards waited for the server,
        retries so far."""
        processes = self.accelerator.num_processes
        waited, self.waited = self.waited, 0.0
        return {"served/wait_seconds": waited / processes, "served/retries": self.retries / processes}

    @contextlib.contextmanager
    def targets(self, batch: dict[str, Tensor]) -> Iterator[StoreTargets]:
        """The micro-batch's targets (scored now when it was not prefetched, e.g. by a test calling it directly)."""
        future = self.pending.pop(id(batch["input_ids"]), None)
        if future is None:
            future = asyncio.run_coroutine_threadsafe(self.score_rows(batch_rows(batch)), self.loop)
        targets = future.result()
        device = batch["input_ids"].device
        yield StoreTargets(TopKTargets(targets.ids.to(device), targets.logp.to(device), targets.log_tail.to(device)))


def row_key(rows: Rows) -> tuple:
    """What identifies a micro-batch's request: the server's answer depends on the ids sent (and k) only."""
    return tuple((sample_id, tuple(ids), tuple(counted)) for sample_id, ids, counted in rows)


def batch_rows(batch: dict[str, Tensor]) -> Rows:
    """Per row of a right-padded micro-batch: its sample id, the ids to score (up to the last counted label: row
    ``t`` of the answer needs ids ``0..t + 1``) and the counted positions (those whose next token is a label)."""
    positions = target_positions(batch["labels"]).cpu()
    input_ids = batch["input_ids"].cpu()
    rows = []
    for b, sample_id in enumerate(batch["sample_ids"].tolist()):
        counted = positions[b].nonzero().flatten().tolist()
        end = counted[-1] + 2 if counted else 0
        rows.append((sample_id, input_ids[b, :end].tolist(), counted))
    return rows
