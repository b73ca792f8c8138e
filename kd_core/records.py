"""Reading the data files users hand us (JSON lines, JSON, parquet, saved ``datasets`` folders), with errors that
name the file, the field that named it and, for JSON lines, the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kd_core.config import ConfigError


def iter_json_objects(
    path: Path, label: str = "", start: int = 0, stop: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(line number, raw line, object)`` for every non-blank line of ``path``.

    A line that is not UTF-8, not JSON, or not a JSON object raises ConfigError as ``{label}{path}:{line}: ...``
    (``label`` names the config field, e.g. ``"calibration.data: "``). Reading is lazy, so a caller that needs only
    the first N records stops early. ``start``/``stop`` (byte offsets at line starts) and ``first_line`` (the line
    number at ``start``) read one range of the file, so workers can each parse their own part.
    """
    with open(path, "rb") as handle:
        handle.seek(start)
        offset = start
        for number, raw_bytes in enumerate(handle, start=first_line):
            if stop is not None and offset >= stop:
                return
            offset += len(raw_bytes)
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


def check_data_path(path: str | Path, field: str = "data.train_file") -> Path:
    """The path of a data file or folder that exists and is not an empty file; ConfigError naming ``field`` else."""
    path = Path(path)
    if not str(path):
        raise ConfigError(f"{field}: no dataset path given")
    if not path.exists():
        raise ConfigError(f"{field}: file not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise ConfigError(f"{field}: dataset is empty: {path}")
    return path


def load_records(path: str | Path, field: str = "data.train_file") -> list[dict[str, Any]]:
    """Reads a jsonl/json/parquet file or a saved `datasets` folder into a list of dicts."""
    path = check_data_path(path, field)
    if path.suffix == ".jsonl" and path.is_file():
        return _read_jsonl(path, field)
    return open_dataset(path, field).to_list()


def open_dataset(path: str | Path, field: str = "data.train_file"):
    """A json/parquet file or a saved `datasets` folder as a memory-mapped ``datasets.Dataset`` (not JSON lines:
    :func:`iter_json_objects` reads those, naming bad lines)."""
    path = check_data_path(path, field)
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
        elif path.suffix == ".json":
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        elif path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            raise ConfigError(f"{field}: expected a .jsonl, .json or .parquet file or a dataset folder, got {path}")
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many types for malformed files; the user needs the file name
        raise ConfigError(f"{field}: could not read {path}: {err}") from None
    if len(ds) == 0:
        raise ConfigError(f"{field}: dataset is empty: {path}")
    return ds


def _read_jsonl(path: Path, field: str) -> list[dict[str, Any]]:
    """JSON lines read line by line, so a malformed line is named ``file:line`` (through ``datasets`` it was one
    error for the whole file), and rows keep their own types for the row checks to name (``datasets`` refuses a
    column whose rows mix types, again without a line). Keys missing from some rows are filled with None, as the
    Arrow table ``datasets`` built did."""
    rows = [obj for _, _, obj in iter_json_objects(path, f"{field}: ")]
    if not rows:
        raise ConfigError(f"{field}: dataset is empty: {path}")
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key) for key in keys} for row in rows]
