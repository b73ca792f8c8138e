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

Every input problem is reported before anything is written. An existing non-empty output directory is refused unless
it is a dedup output and ``--overwrite`` is given, which replaces those four files and nothing else; another
command's output (a training run, a data-gen output) or a user's folder is refused in any case, and so is a directory
another process is writing (:mod:`kd_core.ownership`).
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
from kd_core import ownership
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


# What dedup writes in its output_dir (kd_core.ownership): --overwrite replaces these files and nothing else. Dedup
# wrote no ownership marker before, so its earlier output is recognised by its kept or dropped records.
OUTPUT = ownership.OutputKind(
    "data-gen dedup",
    ("kept.jsonl", "dropped.jsonl", "config.yaml", "summary.json", ".*.tmp"),
    label="dedup",
    legacy=lambda d: (d / "kept.jsonl").is_file() or (d / "dropped.jsonl").is_file(),
    done="summary.json",
)


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
    with ownership.prepare(
        cfg.output_dir,
        OUTPUT,
        {},
        resume=False,
        overwrite=cfg.overwrite,
        remedy="pass --overwrite to replace its files, or choose another output_dir",
    ) as output:
        return _write(cfg, output)


def _write(cfg: DedupConfig, output: ownership.Output) -> dict[str, Any]:
    out = output.path
    lines = read_records(Path(cfg.input), cfg.field)

    start = time.perf_counter()
    kept, dropped = deduplicate(lines, cfg.field, cfg.threshold)
    seconds = time.perf_counter() - start

    output.claim()  # every input checked: from here on the directory is written
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
    output.finish()
    print(f"kept {len(kept)} of {len(lines)} records, dropped {len(dropped)} (threshold {cfg.threshold}) -> {out}")
    return summary


def main(argv: list[str]) -> int:
    cfg = parse_command_line(
        DedupConfig, argv, prog="data-gen dedup", description="Greedy ROUGE-L near-duplicate removal (exact)."
    )
    run(cfg)
    return EXIT_OK
