"""Persistent per-call answer cache (SQLite in WAL mode).

Every answer the teacher produced is stored under a hash of everything that determines it: model, messages,
decoding parameters and the sample index. A rerun, or a pipeline whose code changed but whose prompts did not,
gets the paid-for answer back instead of calling the teacher again. WAL mode lets several processes (shards under
``accelerate launch``) read and write the same file; each write is its own committed transaction, so a ``kill -9``
loses at most the call in flight. With ``teacher.logprobs`` the answer's generated ids and their top-K
log-probabilities are stored with it, in the same row (:class:`data_gen.logprobs.TokenLogprobs`' bytes): paid once,
replayed by every rerun.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def cache_key(model: str, messages: list[dict[str, str]], params: dict[str, Any], sample: int) -> str:
    """Stable sha256 of the call; keys are sorted so dict order never changes the hash."""
    payload = json.dumps(
        {"model": model, "messages": messages, "params": params, "sample": sample},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class CachedAnswer:
    """One stored teacher answer."""

    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    created: float
    logprobs: bytes | None = None


class AnswerCache:
    """``get``/``put`` of answers by key; safe to share between threads of one process and between processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: sqlite3 objects may not be used concurrently from several threads.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._set_up_schema()

    def _set_up_schema(self) -> None:
        """WAL mode and the table. Processes of one `accelerate launch` open a new cache at the same moment, and
        switching a fresh database to WAL fails at once with "database is locked" for all but one of them (SQLite's
        busy timeout does not cover it: 31 of 40 simultaneous pairs failed here), so those retry briefly."""
        for attempt in range(100):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode is durable against process crashes (kill -9); only an OS crash may drop the
                # last commit.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, finish_reason TEXT,"
                    " input_tokens INTEGER, output_tokens INTEGER, created REAL, logprobs BLOB)"
                )
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(answers)")}
                if "logprobs" not in columns:  # a cache of an earlier version: its answers keep a null
                    self._db.execute("ALTER TABLE answers ADD COLUMN logprobs BLOB")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or attempt == 99:
                    raise
                time.sleep(0.05 + random.random() * 0.05)

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, finish_reason, input_tokens, output_tokens, created, logprobs FROM answers WHERE key = ?",
                (key,),
            ).fetchone()
        return CachedAnswer(*row) if row else None

    def put(
        self,
        key: str,
        text: str,
        finish_reason: str,
        input_tokens: int,
        output_tokens: int,
        logprobs: bytes | None = None,
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, text, finish_reason, input_tokens, output_tokens, created, "
                "logprobs) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, text, finish_reason, input_tokens, output_tokens, time.time(), logprobs),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
