"""The teacher's log-probabilities captured while it writes the data (``teacher.logprobs: K``).

With ``K`` set, every chat completion asks the server for the top-``K`` log-probabilities of each token it generates
(``logprobs: true, top_logprobs: K``) and for the tokens as ids (``return_tokens_as_token_ids``, which vLLM and
SGLang understand). The answer's tokens are then known exactly, so nothing is ever re-tokenized: the records carry
them as ``completion_token_ids`` and ``distill train`` trains on these very ids, which is what makes the store's rows
line up with the counted tokens by construction.

* Servers that answer with token *strings* (OpenAI's API) are refused, not mapped: a string such as ``" the"`` or
  ``"bytes:\\xe2\\x80"`` does not always name one id of the teacher's vocabulary, and a store whose ids are guessed
  would train on the wrong targets silently.
* vLLM 0.32 returns the raw model's log-probabilities (its default ``--logprobs-mode raw_logprobs``: before
  temperature, top-p or penalties), the teacher's distribution at temperature 1, whatever the sampling settings. It
  lists the sampled token first: when that token is outside the top ``K`` it takes the ``K``-th place, so each row
  holds the sampled token and the ``K - 1`` (or ``K``) most likely others, all exact; the tail bucket is the rest.
* The paid log-probabilities are part of the cached answer (:class:`TokenLogprobs` packs them into one BLOB of
  ``4 + 8 K`` bytes per token), written in the same transaction as its text: a rerun replays them, never pays twice,
  and ``kill -9`` loses at most the calls in flight.
* :func:`check_server` runs before the first paid call: one probe completion of one token (a server that refuses
  log-probabilities, returns fewer than ``K`` or returns strings is one line, exit 2) and the tokenizer check of
  :func:`kd_core.served.check_tokenizer` against ``teacher.tokenizer``, the local copy of the teacher's tokenizer
  the store is written for.
* :func:`write_store` writes ``<output.dir>/teacher_store`` (:mod:`kd_core.topk_store`'s format, one sample per data
  row with ``completion_token_ids``, keyed by the row) at the end of every run, from the rows and the cache, as the
  data files are: ``distill train --loss.teacher_store <output.dir>/teacher_store`` reads it. A row that is one part
  of an answer (a self-instruct instance, :func:`token_spans`) names its tokens' span in the answer
  (``provenance.token_span``), and its sample holds those tokens' rows only.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_gen.config import TeacherConfig
from kd_core.atomic import atomic_directory
from kd_core.config import ConfigError
from kd_core.redact import redact_value
from kd_core.remote import FatalError, TransientError
from kd_core.topk_store import (
    COMPLETION_FINGERPRINT,
    FORMAT,
    Codec,
    ShardWriter,
    completion_fingerprint,
    file_hash,
    tokenizer_hash,
    vocab_hash,
    write_meta,
)

STORE_DIR = "teacher_store"
_TOKEN_ID = re.compile(r"token_id:(\d+)")


@dataclass
class TokenLogprobs:
    """The generated tokens of one answer and the server's top-``k`` at each: row ``t`` is the distribution the
    ``t``-th token was sampled from (after the prompt and tokens ``0..t-1``)."""

    token_ids: np.ndarray  # int64 [n]
    ids: np.ndarray  # int64 [n, k], the server's order
    logprobs: np.ndarray  # float32 [n, k]

    @property
    def log_tail(self) -> np.ndarray:
        """log of the probability outside the row's ``k`` tokens (float32 [n]; -inf when none is left)."""
        mass = np.exp(self.logprobs.astype(np.float64)).sum(axis=1)
        with np.errstate(divide="ignore"):
            return np.log(np.clip(1.0 - mass, 0.0, None)).astype(np.float32)

    def part(self, start: int, stop: int) -> TokenLogprobs:
        """Tokens ``start..stop-1`` and their rows."""
        return TokenLogprobs(self.token_ids[start:stop], self.ids[start:stop], self.logprobs[start:stop])

    def to_bytes(self) -> bytes:
        """``n, k`` (int32) then the ids (int32) and log-probabilities (float32): 4 + 8 k bytes per token."""
        n, k = self.ids.shape
        parts = (np.asarray([n, k], np.int32), self.token_ids.astype(np.int32), self.ids.astype(np.int32))
        return b"".join(p.tobytes() for p in parts) + self.logprobs.astype(np.float32).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenLogprobs:
        n, k = (int(v) for v in np.frombuffer(data, np.int32, 2))
        token_ids = np.frombuffer(data, np.int32, n, 8).astype(np.int64)
        ids = np.frombuffer(data, np.int32, n * k, 8 + 4 * n).astype(np.int64).reshape(n, k)
        logprobs = np.frombuffer(data, np.float32, n * k, 8 + 4 * n + 4 * n * k).reshape(n, k).copy()
        return cls(token_ids, ids, logprobs)


def request_fields(k: int) -> dict[str, Any]:
    """What a chat completion adds to ask for the top-``k`` of every generated token, as ids."""
    return {"logprobs": True, "top_logprobs": k, "return_tokens_as_token_ids": True}


def _token_id(token: Any) -> int:
    match = _TOKEN_ID.fullmatch(str(token))
    if match is None:
        raise FatalError(
            f"teacher.logprobs: the server returned the token {str(token)[:40]!r} as text, not as an id "
            "(return_tokens_as_token_ids); the store needs the teacher's ids: use a vLLM or SGLang server"
        )
    return int(match.group(1))


def parse_content(content: Any, k: int) -> TokenLogprobs:
    """The ``logprobs.content`` list of a chat completion (every chunk's, joined, when streamed); FatalError when a
    token has fewer than ``k`` candidates (retrying cannot help) or comes as text."""
    if not isinstance(content, list):
        raise FatalError("teacher.logprobs: the server answered without log-probabilities (logprobs.content)")
    n = len(content)
    token_ids = np.empty(n, np.int64)
    ids = np.empty((n, k), np.int64)
    logprobs = np.empty((n, k), np.float32)
    for t, entry in enumerate(content):
        top = entry.get("top_logprobs") if isinstance(entry, dict) else None
        if not isinstance(top, list) or len(top) < k:
            got = len(top) if isinstance(top, list) else 0
            raise FatalError(
                f"teacher.logprobs: the server returned {got} log-probabilities for a generated token, {k} were "
                "asked (vLLM: start it with --max-logprobs >= K)"
            )
        token_ids[t] = _token_id(entry.get("token"))
        for column, candidate in enumerate(top[:k]):
            ids[t, column] = _token_id(candidate.get("token"))
            logprobs[t, column] = max(float(candidate.get("logprob", -1.0e4)), -1.0e4)
    return TokenLogprobs(token_ids, ids, logprobs)


def load_teacher_tokenizer(path: str) -> Any:
    """The teacher's tokenizer as ``distill train`` loads it (a pad token set to EOS where it has none), so that the
    store's tokenizer hash is the one the trainer computes."""
    from kd_core.pretrained import load_tokenizer

    tokenizer = load_tokenizer(path, "teacher.tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def mark_vocabulary(rows: list[dict[str, Any]], tokenizer: Any) -> None:
    """Adds ``completion_vocab_sha256`` to every row with ``completion_token_ids``: ``distill train`` uses the ids
    only with a tokenizer of that vocabulary (another student re-tokenizes the text)."""
    vocab = vocab_hash(tokenizer)
    for row in rows:
        if "completion_token_ids" in row:
            row["completion_vocab_sha256"] = vocab


def captured(result: Any) -> dict[str, Any]:
    """What a pipeline journals of an answer with captured log-probabilities (nothing without): its generated ids and
    the cache key the store reads them back from."""
    if result.token_ids is None:
        return {}
    return {"token_ids": result.token_ids, "logprobs_key": result.logprobs_key}


def token_spans(
    tokenizer: Any, text: str, token_ids: Sequence[int], spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int] | None]:
    """For each character span of an answer's ``text``, the generated tokens ``[a, b)`` that spell it (edge
    whitespace aside, :func:`kd_core.token_text.covering_tokens`), or None where the span does not fall on token
    boundaries. The ids are decoded once; where their text differs from the server's before a span's end (a server
    that detokenizes otherwise), that span is None too: a guessed position would train on the wrong tokens."""
    from kd_core.token_text import completion_offsets, covering_tokens

    decoded, offsets = completion_offsets(tokenizer, [], token_ids)
    return [covering_tokens(decoded, offsets, s, e) if decoded[:e] == text[:e] else None for s, e in spans]


def completion_ids(kept: dict[str, Any]) -> dict[str, Any]:
    """The data row's ``completion_token_ids`` (what ``distill train`` trains on instead of re-tokenizing the text,
    which a pipeline may have stripped): the answer's ids exactly as generated, end-of-turn token included."""
    return {"completion_token_ids": kept["token_ids"]} if kept.get("token_ids") is not None else {}


def logprobs_key(kept: dict[str, Any]) -> dict[str, Any]:
    """The provenance field that leads :func:`write_store` to the answer's log-probabilities in the cache."""
    return {"logprobs_key": kept["logprobs_key"]} if kept.get("logprobs_key") is not None else {}


# ---------------------------------------------------------------------------------------------------------------
# Before the first paid call
# ---------------------------------------------------------------------------------------------------------------


async def check_server(cfg: TeacherConfig, backend: Any, scrub: Any) -> Any:
    """The teacher's tokenizer (``teacher.tokenizer``) once the server has proven, on a one-token probe, that it
    returns ``K`` log-probabilities as ids, and that it tokenizes as that tokenizer does; ConfigError otherwise (one
    line, secrets scrubbed by ``scrub``)."""
    from kd_core.served import PromptScorer, check_tokenizer

    assert cfg.logprobs is not None and cfg.tokenizer is not None
    where = redact_value(cfg.base_url)
    tokenizer = load_teacher_tokenizer(cfg.tokenizer)
    params = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 1, "logprobs": cfg.logprobs}
    try:
        completion = await backend.complete([{"role": "user", "content": "Say OK."}], params)
    except (FatalError, TransientError) as err:
        message = str(err)
        if not message.startswith("teacher.logprobs"):
            message = (
                f"teacher.logprobs: the server at {where} cannot return log-probabilities ({message}); "
                "capturing them needs an OpenAI-compatible server with top_logprobs as token ids, such as vLLM"
            )
        raise ConfigError(scrub(message)) from None
    if completion.logprobs is None or not len(completion.logprobs.token_ids):
        raise ConfigError(f"teacher.logprobs: the server at {where} answered the probe without log-probabilities")
    scorer = PromptScorer(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, field="teacher.tokenizer")
    try:
        await check_tokenizer(scorer, tokenizer, "teacher.tokenizer")
    except (FatalError, TransientError) as err:
        raise ConfigError(scrub(f"teacher.tokenizer: cannot check the server's tokenizer ({err})")) from None
    finally:
        await scorer.aclose()
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# The store, rebuilt at the end of every run
# ---------------------------------------------------------------------------------------------------------------


def write_store(
    out: Path, rows: Sequence[dict[str, Any]], cache: Any, cfg: TeacherConfig, tokenizer: Any, data_files: list[Path]
) -> Path:
    """``out/teacher_store`` from every row with ``completion_token_ids`` (sample id = the row's index in the data
    files), its log-probabilities read back from the answer cache. The previous store is removed first: it is derived
    from the journal and the cache, so a run killed here loses nothing the next run does not rebuild."""
    assert cfg.logprobs is not None
    directory = out / STORE_DIR
    shutil.rmtree(directory, ignore_errors=True)
    codec = Codec(len(tokenizer), cfg.logprobs)
    with atomic_directory(directory) as tmp:
        writer = ShardWriter(tmp, 0, 1, codec)
        for sample_id, row in enumerate(rows):
            token_ids = row.get("completion_token_ids")
            if token_ids is None:
                continue
            captured = _captured(row, cache, codec)
            span = row["provenance"].get("token_span")
            if span is not None:  # one instance of a self-instruct answer: its tokens' rows only
                captured = captured.part(*span)
            if captured.token_ids.tolist() != list(token_ids):
                raise ConfigError(f"{out}: record {row['id']}: its completion_token_ids differ from its cached answer")
            fingerprint = completion_fingerprint(token_ids)
            writer.add(sample_id, fingerprint, captured.ids, captured.logprobs, captured.log_tail)
        shard = writer.close()
        write_meta(tmp, _meta(cfg, tokenizer, codec, shard, data_files))
    return directory


def _captured(row: dict[str, Any], cache: Any, codec: Codec) -> TokenLogprobs:
    hit = cache.get(row["provenance"]["logprobs_key"])
    if hit is None or hit.logprobs is None:
        raise ConfigError(f"record {row['id']}: its answer's log-probabilities are not in the answer cache")
    captured = TokenLogprobs.from_bytes(hit.logprobs)
    if captured.ids.size and int(captured.ids.max()) >= codec.vocab:
        raise ConfigError(
            f"teacher.tokenizer: record {row['id']} holds token id {int(captured.ids.max())}, beyond the "
            f"{codec.vocab} tokens of the tokenizer; it is not the served teacher's"
        )
    return captured


def _meta(cfg: TeacherConfig, tokenizer: Any, codec: Codec, shard: dict[str, Any], data_files: list[Path]):
    import dataclasses

    first, *others = data_files
    return {
        "format": FORMAT,
        "codec": dataclasses.asdict(codec),
        "record_bytes": codec.record_bytes,
        "temperature": 1.0,  # vLLM's raw log-probabilities: before the sampling temperature
        "fingerprint": COMPLETION_FINGERPRINT,
        "teacher": {"path": cfg.model, "served": redact_value(cfg.base_url), "tokenizer": cfg.tokenizer},
        "vocab_sha256": vocab_hash(tokenizer),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "dataset": {
            "file": first.name,
            "sha256": file_hash(first),
            "alternates": {path.name: file_hash(path) for path in others},
        },
        "samples": shard["samples"],
        "tokens": shard["tokens"],
        "shards": [shard],
    }
