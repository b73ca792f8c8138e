"""Crash-safe append-only journal of records (JSON lines), the resumable state of a pipeline.

Each record carries a stable ``id``. ``append`` writes one line, flushes and fsyncs before returning, so a record
the pipeline has been told is saved survives ``kill -9``. A crash in the middle of a write leaves a torn last line
without its newline; :meth:`Journal.open` detects it, truncates it away and reports it, so the rerun regenerates that
one record (from the answer cache, at no cost) instead of reading garbage or duplicating it.

Every line ends with a checksum of its own bytes, as one more JSON field: ``{...record...,"_sum":"<16 hex>"}``, the
XXH3-64 of the line with that field removed (``{...record...}``). A complete line whose checksum does not match (a
flipped byte, a partial overwrite) is refused with ``file:line``, as is an unchecksummed line after a checksummed one;
lines written by the earlier version (no ``_sum`` at all, before any checksummed line) are read as before. The field
is stripped on load: records never carry it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from kd_core.checksum import short_hash

SUM_FIELD = "_sum"
_SUFFIX = re.compile(rb',"_sum":"([0-9a-f]{16})"\}$')


def encode_line(record: dict[str, Any]) -> bytes:
    """One journal line: the compact JSON of ``record`` with its checksum appended as a last field, newline."""
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return body[:-1] + b',"' + SUM_FIELD.encode() + b'":"' + short_hash(body).encode() + b'"}\n'


def decode_line(line: bytes, where: str, require_sum: bool) -> tuple[dict[str, Any], bool]:
    """(record, whether the line carried a checksum); ValueError naming ``where`` (``file:line``) when it is corrupt."""
    line = line.rstrip(b"\r")
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        # A complete line that does not parse was not written by us: refuse to guess.
        raise ValueError(f"{where}: corrupt journal line ({err})") from None
    match = _SUFFIX.search(line)
    if match is None:
        if require_sum or not isinstance(record, dict) or SUM_FIELD in record:
            raise ValueError(f"{where}: corrupt journal line (no valid checksum field; corrupted on disk?)")
        return record, False
    if short_hash(line[: match.start()] + b"}") != match.group(1).decode():
        raise ValueError(f"{where}: corrupt journal line (checksum mismatch; corrupted on disk)")
    record.pop(SUM_FIELD, None)
    return record, True


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
            checked = False  # once a line carries a checksum, every later one must too
            for number, line in enumerate(data[:good_end].split(b"\n"), start=1):
                if not line.strip():
                    continue
                record, has_sum = decode_line(line, f"{self.path}:{number}", require_sum=checked)
                checked = checked or has_sum
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
        self._file.write(encode_line(record))
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
