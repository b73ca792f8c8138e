"""``data-gen dedup``: greedy ROUGE-L near-duplicate removal over one text field of a JSONL file.

Records are read in file order; a record is kept iff the ROUGE-L F of its field against every record kept before it
is ``<= threshold`` (the Self-Instruct rule, exact: :class:`data_gen.rouge.NoveltyIndex`). Outputs, in
``output_dir``:

* ``kept.jsonl``: the kept input lines, unchanged (line endings written as ``\n``), in input order.
* ``dropped.jsonl``: one line per dropped record, in input order:
  ``{"line": 7, "record": {...}, "most_similar_line": 3, "most_similar": {...}, "rouge_l": 0.83}`` where
  ``most_similar`` is the kept record with the highest score (the earliest one on ties), ``rouge_l`` that score and
  the ``line`` numbers are 1-based lines of the input file.
* ``config.yaml`` (the resolved config) and ``summary.json`` (counts, threshold, seconds).

Every input problem is reported before anything is written, and an existing non-empty output directory is refused
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_gen.rouge import NoveltyIndex
from kd_core.atomic import atomic_write_json, atomic_write_text
from kd_core.commands import EXIT_OK
from kd_core.config import ConfigError, option, parse_command_line, save_config
from kd_core.records import iter_json_objects


@dataclass
class DedupConfig:
    """Settings of ``data-gen dedup``."""

    input: str = option("", help="JSONL file, one JSON object per line", positional=True)
    field: str = option("", help="name of the string field compared between records (e.g. instruction)")
    threshold: float = option(0.7, help="a record is dropped when its ROUGE-L F with a kept record exceeds this")
    output_dir: str = option("", help="directory for kept.jsonl, dropped.jsonl, config.yaml, summary.json")
    overwrite: bool = option(False, help="replace the output files in a non-empty output_dir")

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("input: expected the path of a JSONL file")
        if not self.field:
            raise ValueError("field: expected the name of a string field (--field NAME)")
        if not self.output_dir:
            raise ValueError("output_dir: expected a directory (--output-dir DIR)")
        if math.isnan(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold: expected a number in [0, 1], got {self.threshold}")


@dataclass
class _Line:
    """One input record with the raw line it came from (kept lines are written back unchanged)."""

    number: int
    raw: str
    record: dict[str, Any]


def read_records(path: Path, field: str) -> list[_Line]:
    """Reads and checks every record; raises ConfigError naming file:line for the first bad one."""
    if not path.is_file():
        raise ConfigError(f"input: file not found: {path}")
    lines = []
    for number, raw, record in iter_json_objects(path):
        if field not in record:
            raise ConfigError(f"{path}:{number}: record has no field '{field}'")
        if not isinstance(record[field], str):
            kind = type(record[field]).__name__
            raise ConfigError(f"{path}:{number}: field '{field}' must be a string, got {kind}")
        lines.append(_Line(number, raw, record))
    if not lines:
        raise ConfigError(f"{path}: no records (the file is empty)")
    return lines


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuses a file in place of the directory, or a non-empty directory without ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir: {path} is not empty (pass --overwrite to replace its files)")


def deduplicate(lines: list[_Line], field: str, threshold: float) -> tuple[list[_Line], list[dict[str, Any]]]:
    """Greedy filter in input order: (kept lines, dropped annotations)."""
    index = NoveltyIndex(threshold)
    kept: list[_Line] = []
    dropped: list[dict[str, Any]] = []
    for line in tqdm(lines, desc="dedup", unit="rec", mininterval=0.5):
        text = line.record[field]
        # is_novel may stop at the first kept text above the threshold; only a dropped record needs the argmax.
        if index.is_novel(text):
            index.add(text)
            kept.append(line)
            continue
        best, score = index.most_similar(text)
        assert best is not None  # not novel implies a non-empty index
        similar = kept[best]
        dropped.append(
            {
                "line": line.number,
                "record": line.record,
                "most_similar_line": similar.number,
                "most_similar": similar.record,
                "rouge_l": score,
            }
        )
    return kept, dropped


Config = DedupConfig


def run(cfg: DedupConfig) -> dict[str, Any]:
    """Writes ``kept.jsonl``, ``dropped.jsonl``, ``config.yaml`` and ``summary.json``; returns the summary."""
    out = Path(cfg.output_dir)
    check_output_dir(out, cfg.overwrite)
    lines = read_records(Path(cfg.input), cfg.field)

    start = time.perf_counter()
    kept, dropped = deduplicate(lines, cfg.field, cfg.threshold)
    seconds = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "kept.jsonl", "".join(line.raw + "\n" for line in kept))
    atomic_write_text(out / "dropped.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dropped))
    save_config(cfg, out / "config.yaml")
    summary = {
        "input": cfg.input,
        "field": cfg.field,
        "threshold": cfg.threshold,
        "records": len(lines),
        "kept": len(kept),
        "dropped": len(dropped),
        "seconds": round(seconds, 3),
    }
    atomic_write_json(out / "summary.json", summary, indent=2, trailing_newline=True)
    print(f"kept {len(kept)} of {len(lines)} records, dropped {len(dropped)} (threshold {cfg.threshold}) -> {out}")
    return summary


def main(argv: list[str]) -> int:
    cfg = parse_command_line(
        DedupConfig, argv, prog="data-gen dedup", description="Greedy ROUGE-L near-duplicate removal (exact)."
    )
    run(cfg)
    return EXIT_OK
