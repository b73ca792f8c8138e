"""Final data files and dataset card, written from a pipeline's journal.

The journal (``journal.jsonl``) is the crash-safe working state; these files are rebuilt from it at the end of every
run (atomically and fsynced, with :mod:`kd_core.atomic`), so they always match the journal. Every record carries chat
``messages`` (what the distill trainer reads) and ``instruction``/``input``/``output`` columns, plus ``provenance``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kd_core.atomic import atomic_open, atomic_path, atomic_write_text
from kd_core.redact import redact_urls


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    with atomic_open(path) as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_parquet(records: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(records), tmp)


def write_outputs(records: list[dict[str, Any]], out_dir: str | Path, formats: list[str], card: str) -> list[Path]:
    """``data.jsonl`` / ``data.parquet`` and ``README.md`` (the dataset card) in ``out_dir``."""
    out_dir = Path(out_dir)
    written = []
    if "jsonl" in formats:
        written.append(out_dir / "data.jsonl")
        write_jsonl(records, written[-1])
    if "parquet" in formats:
        written.append(out_dir / "data.parquet")
        write_parquet(records, written[-1])
    atomic_write_text(out_dir / "README.md", card)
    return written


def dataset_card(
    title: str, summary: str, n_records: int, formats: list[str], teacher: dict[str, Any], stats: str
) -> str:
    """A short card with the Hub's YAML header (so ``load_dataset(dir)`` finds the data) and how it was made."""
    data_file = "data.parquet" if "parquet" in formats else "data.jsonl"
    header = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}]}
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        f"# {title}",
        "",
        summary,
        "",
        f"- records: {n_records}",
        f"- files: {', '.join('data.' + f for f in formats)} (columns: id, instruction, input, output, messages, "
        "provenance)",
        f"- teacher: {teacher.get('model')} via {teacher.get('backend')}"
        f"{' at ' + redact_urls(str(teacher['base_url'])) if teacher.get('base_url') else ''}",
        f"- decoding: {json.dumps(teacher.get('decoding', {}), sort_keys=True)}",
        "- the resolved config is in `config.yaml`; per-record provenance gives the prompt-template hash, seed, "
        "decoding and timestamps",
        "",
        'Load it with `datasets.load_dataset("<this directory>")`, or train on it directly: the `messages` column '
        "is what `distill train` reads.",
        "",
        "## Run summary",
        "",
        "```",
        stats,
        "```",
        "",
    ]
    return "\n".join(lines)
