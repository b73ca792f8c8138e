"""``distill precompute`` with ``teacher_url``: the store's segments filled from a served teacher's prompt
log-probabilities (:mod:`kd_core.served`), paid for once.

Each row of the training set is sent as its own token ids (as the run's tokenizer made them: nothing is
re-tokenized) with ``prompt_logprobs: k``; the answer's rows at the counted positions become the row's records,
exactly those :func:`distill.offline.precompute.teacher_topk` computes from a local teacher: the k most likely ids,
their log-probabilities and the log tail mass.

A scored row is paid for, so it is journaled before anything else happens to it: appended (and fsynced) to its
segment's journal ``segment-NNNNNN.rows`` as the answer arrives, rows of a segment being scored concurrently and
arriving in any order. Once every row of the segment is in the journal, the segment is committed from it in the
span's order (:func:`distill.offline.segments.write_encoded`) and the journal removed. A run killed at any point
(``kill -9``, a server gone for good, the budget cap) is resumed by the same command: committed segments are kept,
and a journal's whole entries are reused, so no row already received is asked for again. A journal entry::

    int64 position, int64 sample_id, int64 tokens, int64 fingerprint, uint32 crc32 of the records, records

An entry cut short by a kill (or failing its checksum) ends the journal there; it is truncated before appending.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from tqdm.auto import tqdm

from distill.losses.objective import target_positions
from distill.offline import segments
from distill.offline.store import Codec, sample_fingerprint
from kd_core.commands import Stopped
from kd_core.config import ConfigError
from kd_core.redact import check_env_var_name, scrub, url_secrets
from kd_core.retry import Attempt, RetriesExhausted
from kd_core.served import PROBE_TEXT, PromptScorer, check_tokenizer
from kd_core.served_limits import ServedCalls, ServedLimits

logger = logging.getLogger("distill")

HEADER = struct.Struct("<qqqqI")


def served_identity(url: str, model: str) -> str:
    """``host:port/model``: how a store names a served teacher (no user info, path or query: no credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}/{model}" if parts.port else f"{host}/{model}"


def check_config(cfg: Any) -> None:
    """ValueError naming the field when a PrecomputeConfig with ``teacher_url`` cannot run (its __post_init__)."""
    # The URL is never echoed: it may carry credentials.
    if cfg.teacher:
        raise ValueError("teacher_url: a served teacher replaces the local `teacher`; set one of them")
    if not cfg.teacher_url.startswith(("http://", "https://")):
        raise ValueError("teacher_url: expected an http(s):// base URL of an OpenAI-compatible server")
    if not cfg.teacher_model:
        raise ValueError("teacher_model: the served model's name is required with teacher_url")
    if not cfg.student_tokenizer:
        raise ValueError("student_tokenizer: the student's model directory (its tokenizer) is needed with teacher_url")
    check_env_var_name("teacher_api_key_env", cfg.teacher_api_key_env)
    if cfg.temperature != 1.0:
        raise ValueError(
            f"temperature: a served teacher gives temperature-1 log-probabilities of its top k only, from which "
            f"temperature {cfg.temperature} cannot be computed exactly; use 1.0 (or a local teacher)"
        )
    if cfg.teacher_device_map:
        raise ValueError("teacher_device_map: places a local teacher; a served teacher has none")


def journal_name(number: int) -> str:
    return f"segment-{number:06d}.rows"


class RowJournal:
    """The rows of one segment received so far: ``entries`` maps a dataset position to (offset, tokens) of its
    records in the file (memory: one segment's positions)."""

    def __init__(self, path: Path, codec: Codec, expected: Callable[[int], tuple[int, int]]) -> None:
        self.path = path
        self.codec = codec
        self.entries: dict[int, tuple[int, int]] = {}
        end = self._scan(expected) if path.exists() else 0
        with open(path, "ab") as handle:
            handle.truncate(end)  # a torn last entry goes; appends continue after the last whole one
        self.handle = open(path, "ab")

    def _scan(self, expected: Callable[[int], tuple[int, int]]) -> int:
        """Reads the whole entries (skipping any whose row no longer matches the dataset); returns where they end."""
        end = 0
        with open(self.path, "rb") as handle:
            while header := handle.read(HEADER.size):
                if len(header) < HEADER.size:
                    break
                position, sample_id, tokens, fingerprint, crc = HEADER.unpack(header)
                size = tokens * self.codec.record_bytes
                data = handle.read(size)
                if tokens < 0 or len(data) < size or zlib.crc32(data) != crc:
                    break
                end = handle.tell()
                if expected(position) == (sample_id, fingerprint):
                    self.entries[position] = (end - size, tokens)
        return end

    def append(self, position: int, sample_id: int, fingerprint: int, tokens: int, data: bytes) -> None:
        """Journals one received row, durably, before it counts as received."""
        self.handle.write(HEADER.pack(position, sample_id, tokens, fingerprint, zlib.crc32(data)) + data)
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.entries[position] = (self.handle.tell() - len(data), tokens)

    def rows(self, span: range, expected: Callable[[int], tuple[int, int]]) -> Iterator[tuple[int, int, int, bytes]]:
        """The span's rows in order, as :func:`distill.offline.segments.write_encoded` takes them."""
        with open(self.path, "rb") as handle:
            for position in span:
                offset, tokens = self.entries[position]
                handle.seek(offset)
                sample_id, fingerprint = expected(position)
                yield sample_id, fingerprint, tokens, handle.read(tokens * self.codec.record_bytes)

    def close(self) -> None:
        self.handle.close()


def probe(cfg: Any, tokenizer: Any) -> None:
    """Before anything is written: the server answers, tokenizes as ``tokenizer`` does, and returns ``k``
    log-probabilities per position. One ConfigError naming the field otherwise (an unreachable URL included)."""

    async def check() -> None:
        scorer = _scorer(cfg)
        try:
            await check_tokenizer(scorer, tokenizer, "teacher_url")
            ids = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
            await scorer.score(ids, cfg.k, "the probe text")
        finally:
            await scorer.aclose()

    limits: ServedLimits = cfg.served

    async def checked() -> None:
        async def attempt(first_token) -> Attempt[None]:
            await check()
            return Attempt(None, 0)

        await ServedCalls(limits).retrying(attempt, tokens=0)

    try:
        asyncio.run(checked())
    except RetriesExhausted as err:
        what = "refused the probe" if err.fatal else "cannot be reached"
        line = f"teacher_url: {served_identity(cfg.teacher_url, cfg.teacher_model)} {what}: {err}"
        raise ConfigError(scrub(line, secrets(cfg))) from None


def _scorer(cfg: Any) -> PromptScorer:
    return PromptScorer(
        cfg.teacher_url,
        cfg.teacher_model,
        api_key_env=cfg.teacher_api_key_env,
        timeout_s=cfg.served.timeout_s,
        field="teacher_url",
    )


def secrets(cfg: Any) -> list[str]:
    """What no line may show: the key in ``$<teacher_api_key_env>`` and the credentials in ``teacher_url``."""
    key = os.environ.get(cfg.teacher_api_key_env) if cfg.teacher_api_key_env else None
    return [s for s in (key, *url_secrets(cfg.teacher_url)) if s]


class _Run:
    """One pass over the pending segments: the scorer, the shared limits and budget, and the first failure."""

    def __init__(self, cfg: Any, train_set: Any, codec: Codec, vocab: int) -> None:
        self.cfg, self.train_set, self.codec, self.vocab = cfg, train_set, codec, vocab
        self.calls = ServedCalls(cfg.served)
        self.secrets = secrets(cfg)
        self.stopped: str | None = None  # 'budget' or 'teacher_unreachable': resumable
        self.failure: str | None = None  # a fatal answer: the one line to report
        self.received = 0

    async def row(self, scorer: PromptScorer, journal: RowJournal, position: int) -> None:
        """Scores one row and journals it; a failure is recorded (the first one wins) for the caller to report."""
        example = self.train_set[position]
        ids = list(example["input_ids"])
        # The positions whose next token is counted: those the local teacher's hidden states are taken at.
        counted = target_positions(torch.as_tensor([example["labels"]]))[0].numpy()
        where = f"row {position} (sample {example['sample_id']})"
        try:
            answer = await self.calls.score(scorer, ids, self.cfg.k, where)
        except RetriesExhausted as err:
            if not err.fatal:
                self.stopped = self.stopped or "teacher_unreachable"
            self.failure = self.failure or str(err)
            return
        if answer is None:
            self.stopped = self.stopped or "budget"
            return
        rows = counted[:-1]
        top, logp, tail = answer.ids[rows], answer.logprobs[rows], answer.log_tail[rows]
        if top.size and int(top.max()) >= self.vocab:
            self.failure = self.failure or (
                f"{where}: the server returned token id {int(top.max())}, outside the tokenizer's {self.vocab} "
                "(a teacher with another vocabulary)"
            )
            return
        data = self.codec.encode(top, logp, tail).tobytes()
        journal.append(position, int(example["sample_id"]), sample_fingerprint(example), int(rows.sum()), data)
        self.received += 1

    def expected(self, position: int) -> tuple[int, int]:
        example = self.train_set[position]
        return int(example["sample_id"]), sample_fingerprint(example)


async def _score_segments(work: _Run, out: Path, all_spans: list[range], todo: list[int], bar: tqdm) -> None:
    """Scores the rows of each pending segment that its journal lacks (at most twice the concurrency limit in
    flight), then commits the segment; returns at the first stop or failure, every received row journaled."""
    scorer = _scorer(work.cfg)
    window = asyncio.Semaphore(2 * work.cfg.served.concurrency)  # rows dispatched ahead: bounded memory

    async def one(journal: RowJournal, position: int) -> None:
        try:
            await work.row(scorer, journal, position)
            bar.update(1)
        finally:
            window.release()

    try:
        for number in todo:
            span = all_spans[number]
            journal = RowJournal(out / journal_name(number), work.codec, work.expected)
            bar.update(len(journal.entries))
            tasks = []
            for position in span:
                if position in journal.entries:
                    continue
                await window.acquire()
                if work.stopped or work.failure:
                    window.release()
                    break
                tasks.append(asyncio.create_task(one(journal, position)))
            await asyncio.gather(*tasks)
            journal.close()
            if work.stopped or work.failure:
                return
            segments.write_encoded(out, number, span, work.codec, journal.rows(span, work.expected))
            (out / journal_name(number)).unlink()  # committed: the segment's files hold every row now
    finally:
        await scorer.aclose()


def write_segments(cfg: Any, out: Path, train_set: Any, all_spans: list[range], todo: list[int], codec: Codec) -> None:
    """Fills the pending segments ``todo`` from the served teacher. Raises :class:`~kd_core.commands.Stopped` when
    the budget or a server gone for good stops the run (resumable: every received row is kept), ConfigError on an
    answer that retrying cannot fix (resumable too, once the cause is fixed)."""
    for number, _ in enumerate(all_spans):  # a committed segment's journal outlived the commit only by a kill
        if number not in todo:
            (out / journal_name(number)).unlink(missing_ok=True)
    work = _Run(cfg, train_set, codec, codec.vocab)
    total = sum(len(all_spans[n]) for n in todo)
    with tqdm(total=total, desc="precompute rows (served)", unit="row") as bar:
        asyncio.run(_score_segments(work, out, all_spans, todo, bar))
    kept = f"{work.received} rows received in this run are kept; rerun the same command to continue"
    spent = f"${work.calls.budget.spent_usd:.4f} spent"
    if work.stopped == "budget":
        raise Stopped("budget", f"stopped: served.max_cost_usd reached ({spent}); {kept}")
    teacher = served_identity(cfg.teacher_url, cfg.teacher_model)
    if work.stopped:
        line = scrub(f"stopped: teacher_url: {teacher} stopped answering ({work.failure}); {kept}", work.secrets)
        raise Stopped(work.stopped, line)
    if work.failure:
        raise ConfigError(scrub(f"teacher_url: {teacher}: {work.failure} ({kept} once fixed)", work.secrets))
    logger.info("served teacher %s: %d rows scored in this run, %s", teacher, work.received, spent)
