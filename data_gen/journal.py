"""Crash-safe append-only journal of records (JSON lines), the resumable state of a pipeline.

Each record carries a stable ``id``. ``append`` writes one line, flushes and fsyncs before returning, so a record
the pipeline has been told is saved survives ``kill -9``. A crash in the middle of a write leaves a torn last line
without its newline; :meth:`Journal.open` detects it, truncates it away and reports it, so the rerun regenerates that
one record (from the answer cache, at no cost) instead of reading garbage or duplicating it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Journal:
    """Records by id, loaded from disk on open and appended durably."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self.dropped_torn_line = False
        self._file: Any = None

    def open(self) -> Journal:
        """Loads existing records (dropping a torn tail) and opens the file for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            good_end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
            if good_end < len(data):
                self.dropped_torn_line = True
                with open(self.path, "r+b") as f:
                    f.truncate(good_end)
                    f.flush()
                    os.fsync(f.fileno())
            for number, line in enumerate(data[:good_end].splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    # A complete line that does not parse was not written by us: refuse to guess.
                    raise ValueError(f"{self.path}:{number}: corrupt journal line ({err})") from None
                self.records[record["id"]] = record
        self._file = open(self.path, "ab")
        return self

    @staticmethod
    def count(path: str | Path) -> int:
        """Complete lines already in the journal at ``path``, without opening it for writing."""
        path = Path(path)
        return path.read_bytes().count(b"\n") if path.exists() else 0

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> bool:
        """Writes ``record`` durably; returns False (and writes nothing) when its id is already journaled."""
        if record["id"] in self.records:
            return False
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[record["id"]] = record
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
