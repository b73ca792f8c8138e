"""Reading JSON-lines files that users hand us, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.configuration import ConfigError


def iter_json_objects(path: Path, label: str = "") -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(line number, raw line, object)`` for every non-blank line of ``path``.

    A line that is not UTF-8, not JSON, or not a JSON object raises ConfigError as ``{label}{path}:{line}: ...``
    (``label`` names the config field, e.g. ``"calibration.data: "``). Reading is lazy, so a caller that needs only
    the first N records stops early.
    """
    with open(path, "rb") as handle:
        for number, raw_bytes in enumerate(handle, start=1):
            where = f"{label}{path}:{number}"
            try:
                raw = raw_bytes.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise ConfigError(f"{where}: not UTF-8 text") from None
            if not raw.strip():
                continue  # blank lines (a trailing newline, say) hold no record
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield number, raw, record
