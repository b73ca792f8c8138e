"""Tokenized data on disk: each data file is tokenized once into memory-mapped Arrow files, then only mapped.

A run's examples are never held in Python lists: the tokenized rows live in Arrow files that every process maps
(the operating system shares and evicts the pages), and a run keeps only per-example index arrays (8 bytes each).

* **Where**: ``data.cache_dir``, by default ``$HF_DATASETS_CACHE/distill_kd`` (``~/.cache/huggingface/datasets``).
  Not under the run's ``output_dir``: the cache is keyed by content, so every run and command on the same data
  (train, precompute, a rerun in a new directory) shares one copy, and removing a run never forces a re-tokenization.
  Clusters usually point ``HF_DATASETS_CACHE`` at a large shared disk already. Delete the folder to clear it.
* **Key**: a hash of the data file's bytes, the tokenizer (vocabulary, chat template, special tokens, its full
  tokenization pipeline), the settings that change tokens (format, max_length, completion_only_loss,
  step_by_step_label_weight, ce_weight_field) and the versions of transformers, tokenizers and datasets. Eval split,
  max_samples and seed are applied afterwards as index arrays, so changing them reuses the cache.
* **Building**: ``datasets.Dataset.map`` with ``num_proc`` worker processes over chunks of the file (byte ranges of
  a JSON lines file, so every bad row is still named ``file:line``), written to a hidden temporary folder and
  renamed into place when complete: a killed build leaves nothing that is mistaken for a cache, and two jobs
  building the same key at once both end with one complete copy.
* **Several processes**: the first process of each node (``LOCAL_RANK`` 0) builds; the others wait at one barrier,
  then poll the file system (no collective stays open while tokenization runs, so no process-group timeout applies)
  until the cache is there or the builder has left its error, which they raise as their own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from distill.data.cross import CROSS_FEATURES
from kd_core import checksum
from kd_core.atomic import atomic_write_json, atomic_write_text, publish_directory
from kd_core.config import ConfigError
from kd_core.records import check_data_path, iter_json_objects, open_dataset
from kd_core.topk_store import tokenizer_hash, vocab_hash  # noqa: F401 (precompute and checkpoints import them here)

logger = logging.getLogger(__name__)

# Bump when the tokenization code changes what it writes. 2: the teacher's own BOS in the cross-tokenizer columns
# (e069dcf changed them without a bump, so caches written before it kept teacher ids without the BOS).
CACHE_VERSION = 2
META = "meta.json"
CHUNK_ROWS = 1000  # rows per map batch: bounds each worker's Python memory (a few MB of lists)
MAX_PROCESSES = 32


class RowFunctions(NamedTuple):
    """How records become examples (:mod:`distill.data.datasets`, which calls this module: passed in, not imported,
    so imports run one way): ``record_shape(first_record, settings, where)`` and ``examples_of(record, shape,
    tokenizer, settings, where, first)``. Module-level functions, so the worker processes receive them by name."""

    record_shape: Callable
    examples_of: Callable


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "distill_kd"


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What decides the tokens a tokenizer gives: the offline store's hash plus, for a fast tokenizer, its whole
    pipeline (normalizer, pre-tokenizer, merges, post-processor: e.g. whether a BOS is added)."""

    pipeline = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(tokenizer.init_kwargs)
    return {"tokenizer": tokenizer_hash(tokenizer), "pipeline": checksum.bytes_hash(pipeline.encode())}


def content_hash(path: Path) -> str:
    """Hash of a data file's bytes, or of every file (with its relative name) of a dataset folder."""
    if path.is_file():
        return checksum.file_hash(path)
    digest = checksum.hasher()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}:{checksum.file_hash(file)}\n".encode())
    return digest.hexdigest()


def cache_key(path: Path, tokenizer, settings, teacher_tokenizer=None) -> str:
    import datasets
    import tokenizers
    import transformers

    key = {
        "version": CACHE_VERSION,
        "data": content_hash(path),
        **tokenizer_identity(tokenizer),
        "format": settings.format,
        "max_length": settings.max_length,
        "completion_only_loss": settings.completion_only_loss,
        "step_by_step_label_weight": settings.step_by_step_label_weight,
        "ce_weight_field": settings.ce_weight_field,
        "libraries": [transformers.__version__, tokenizers.__version__, datasets.__version__],
    }
    if teacher_tokenizer is not None:  # cross-tokenizer distillation: the teacher's tokens are cached too
        key["teacher"] = tokenizer_identity(teacher_tokenizer)
        key["cross_columns"] = sorted(CROSS_FEATURES)  # a cache from before a column was added is rebuilt
    return checksum.bytes_hash(json.dumps(key, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------------------------
# Reading the source in chunks
# ---------------------------------------------------------------------------------------------------------------


def _jsonl_chunks(path: Path, field: str) -> tuple[dict[str, list[int]], int]:
    """Byte ranges of ``CHUNK_ROWS`` records each, with the line number and row index each starts at, and the
    number of records. Lines are only split here; each worker parses (and checks) its own range."""
    chunks: dict[str, list[int]] = {"start": [], "stop": [], "line": [], "row": []}
    rows, offset = 0, 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                if rows % CHUNK_ROWS == 0:
                    if chunks["start"]:
                        chunks["stop"].append(offset)
                    for name, value in (("start", offset), ("line", number), ("row", rows)):
                        chunks[name].append(value)
                rows += 1
            offset += len(raw)
    if not rows:
        raise ConfigError(f"{field}: dataset is empty: {path}")
    chunks["stop"].append(offset)
    return chunks, rows


def _chunk_records(chunk: dict[str, int], source: dict[str, Any]):
    """``(row index, where, record)`` for the records of one chunk; ``where`` is ``file:line`` or ``file: row N``."""
    path = Path(source["path"])
    if source["raw"] is None:
        objects = iter_json_objects(path, f"{source['field']}: ", chunk["start"], chunk["stop"], chunk["line"])
        for row, (line, _, record) in enumerate(objects, start=chunk["row"]):
            yield row, f"{path}:{line}", record
        return
    batch = source["raw"][chunk["start"] : chunk["stop"]]
    for offset, values in enumerate(zip(*batch.values())):
        row = chunk["start"] + offset
        yield row, f"{path}: row {row}", dict(zip(batch.keys(), values))


def _tokenize_chunk(
    batch: dict[str, list[int]],
    source: dict[str, Any],
    tokenizer,
    settings,
    examples_of: Callable,
    teacher_tokenizer=None,
) -> dict[str, list]:
    """The ``Dataset.map`` function: one chunk (``batch_size`` 1) in, its kept examples out."""
    names = _feature_types(teacher_tokenizer)
    out: dict[str, list] = {name: [] for name in names}
    chunk = {name: values[0] for name, values in batch.items()}
    for row, where, record in _chunk_records(chunk, source):
        for example in examples_of(
            record, source["shape"], tokenizer, settings, where, source["first"], teacher_tokenizer
        ):
            example["sample_id"] = row
            for name in names:
                out[name].append(example[name])
    return out


FEATURE_TYPES = {
    "input_ids": ("list", "int32"),
    "labels": ("list", "int32"),
    "prompt_length": "int32",
    "has_completion": "bool",
    "sample_id": "int64",
    "loss_weight": "float64",
}


def _feature_types(teacher_tokenizer) -> dict[str, Any]:
    """The cached columns: with a teacher tokenizer, also the teacher's tokens and the aligned positions."""
    return FEATURE_TYPES if teacher_tokenizer is None else {**FEATURE_TYPES, **CROSS_FEATURES}


def _features(teacher_tokenizer=None):
    import datasets

    return datasets.Features(
        {
            name: datasets.List(datasets.Value(kind[1])) if isinstance(kind, tuple) else datasets.Value(kind)
            for name, kind in _feature_types(teacher_tokenizer).items()
        }
    )


# ---------------------------------------------------------------------------------------------------------------
# Building and loading one file's cache
# ---------------------------------------------------------------------------------------------------------------


def _source(path: Path, field: str, settings, record_shape: Callable) -> tuple[dict[str, Any], dict, int]:
    """What the workers read (the file, or the memory-mapped table of a parquet/json/folder source), its chunks,
    and the number of records; the shape every row must have is detected from the first record."""
    raw = None
    if path.suffix == ".jsonl" and path.is_file():
        chunks, rows = _jsonl_chunks(path, field)
        line, _, first = next(iter_json_objects(path, f"{field}: "))
        first_where = f"{path}:{line}"
    else:
        raw = open_dataset(path, field)
        rows = len(raw)
        starts = list(range(0, rows, CHUNK_ROWS))
        chunks = {"start": starts, "stop": [min(start + CHUNK_ROWS, rows) for start in starts]}
        first, first_where = raw[0], f"{path}: row 0"
    shape = record_shape(first, settings, first_where)
    return {"path": str(path), "field": field, "raw": raw, "shape": shape, "first": first_where}, chunks, rows


def _build(
    path: Path, field: str, tokenizer, settings, target: Path, rows_of: RowFunctions, teacher_tokenizer=None
) -> None:
    """Tokenizes ``path`` into ``target``: filled in a hidden temporary folder beside it, then renamed."""
    import datasets

    source, chunks, rows = _source(path, field, settings, rows_of.record_shape)
    table = datasets.Dataset.from_dict(chunks)
    available = len(os.sched_getaffinity(0))
    processes = min(settings.num_proc or min(available, MAX_PROCESSES), len(table))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        started = time.monotonic()
        table.map(
            _tokenize_chunk,
            batched=True,
            batch_size=1,
            num_proc=processes if processes > 1 else None,
            remove_columns=table.column_names,
            features=_features(teacher_tokenizer),
            cache_file_name=str(tmp / "tokens.arrow"),
            new_fingerprint=target.name,
            fn_kwargs={
                "source": source,
                "tokenizer": tokenizer,
                "settings": settings,
                "examples_of": rows_of.examples_of,
                "teacher_tokenizer": teacher_tokenizer,
            },
            desc=f"tokenizing {path.name}",
        )
        files = sorted(p.name for p in tmp.glob("tokens*.arrow"))
        atomic_write_json(
            tmp / META,
            {
                "source": str(path),
                "rows": rows,
                "shape": source["shape"],
                "files": files,
                "seconds": round(time.monotonic() - started, 1),
            },
        )
        try:
            publish_directory(tmp, target)
        except OSError:
            if not (target / META).exists():
                raise
            shutil.rmtree(tmp)  # another job published the same key first: identical content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("%s: tokenized %d rows into %s in %.0f s", field, rows, target, time.monotonic() - started)


def _load(target: Path, field: str):
    """The cached examples (memory-mapped) and the number of source records."""
    import datasets

    try:
        meta = json.loads((target / META).read_text())
        parts = [datasets.Dataset.from_file(str(target / name)) for name in meta["files"]]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{field}: the tokenized cache {target} is damaged ({err}); delete it to rebuild") from None
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0], meta["rows"]


def _builds_here() -> bool:
    """Whether this process builds caches: every process of a single-process run, else the first of its node."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return True
    return int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())) == 0


def tokenized_file(source: str, field: str, tokenizer, settings, rows_of: RowFunctions, teacher_tokenizer=None):
    """The examples of one data file (a memory-mapped ``datasets.Dataset``: ``sample_id`` is the record's row) and
    its number of records; built once per key, mapped afterwards (see the module docstring). ``teacher_tokenizer``:
    with the teacher's tokens and aligned positions (:mod:`distill.data.cross`)."""
    path = check_data_path(source, field)
    root = cache_root(settings.cache_dir)
    target = root / cache_key(path, tokenizer, settings, teacher_tokenizer)
    verdict = root / f"{target.name}.error"
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    builder = _builds_here()
    if builder and distributed:
        verdict.unlink(missing_ok=True)  # an earlier job's; the barrier below keeps waiters from reading it
    if distributed:
        torch.distributed.barrier()  # the one collective here, on every rank, before any long work
    if not builder:
        _wait_for(target, verdict, field)
    elif not (target / META).exists():
        try:
            _build(path, field, tokenizer, settings, target, rows_of, teacher_tokenizer)
        except ConfigError as err:
            if distributed:
                atomic_write_text(verdict, str(err))
            raise
        except OSError as err:
            raise ConfigError(f"data.cache_dir: cannot write the tokenized cache under {root}: {err}") from None
    return _load(target, field)


def _wait_for(target: Path, verdict: Path, field: str) -> None:
    """Polls until the node's builder has published ``target`` or left its error (raised here as this rank's)."""
    waited = 0.0
    while not (target / META).exists():
        if verdict.exists():
            raise ConfigError(verdict.read_text())
        time.sleep(0.5)
        waited += 0.5
        if waited % 60 == 0:
            logger.info("%s: waiting for the first process of this node to tokenize into %s", field, target)


# ---------------------------------------------------------------------------------------------------------------
# The examples a run uses: index arrays over the cache
# ---------------------------------------------------------------------------------------------------------------


class ArrowExamples(torch.utils.data.Dataset):
    """Examples ``table[rows[i]]`` of a memory-mapped table: a run holds 8 bytes per example, not the tokens."""

    def __init__(self, table, rows: np.ndarray) -> None:
        self.table = table
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self.rows) <= index < len(self.rows):
            raise IndexError(index)
        return self.table[int(self.rows[index])]

    def __iter__(self):
        return (self[i] for i in range(len(self.rows)))

    @property
    def examples(self) -> ArrowExamples:
        """The examples in order (the name :class:`distill.data.datasets.TokenizedDataset` gives its list)."""
        return self

    def column(self, name: str) -> np.ndarray:
        """One scalar column for these examples, read from the mapped file (not through Python rows)."""
        return self.table.data.column(name).to_numpy()[self.rows]

    def first_without_completion(self) -> int | None:
        """The ``sample_id`` of the first prompt-only example, or None."""
        missing = np.flatnonzero(~self.column("has_completion"))
        return int(self.column("sample_id")[missing[0]]) if len(missing) else None


def split_examples(
    settings, tokenizer, seed: int, rows_of: RowFunctions, teacher_tokenizer=None
) -> tuple[ArrowExamples, ArrowExamples | None]:
    """Train and eval examples (:func:`distill.data.datasets.build_datasets`)."""
    table, rows = tokenized_file(
        settings.train_file, "data.train_file", tokenizer, settings, rows_of, teacher_tokenizer
    )
    sample_ids = table.data.column("sample_id").to_numpy()
    held = np.zeros(rows, dtype=bool)
    eval_set = None
    if settings.eval_file:
        eval_table, _ = tokenized_file(
            settings.eval_file, "data.eval_file", tokenizer, settings, rows_of, teacher_tokenizer
        )
        if not len(eval_table):
            raise ConfigError(
                f"{settings.eval_file}: no example has target tokens within max_length={settings.max_length}"
            )
        eval_set = ArrowExamples(eval_table, np.arange(len(eval_table)))
    elif settings.eval_fraction > 0 and rows > 1:
        # The same rows as when records were held in lists: the first of a seeded permutation of the rows.
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        held[order[: max(1, int(rows * settings.eval_fraction))].numpy()] = True
        eval_set = ArrowExamples(table, np.flatnonzero(held[sample_ids]))
    train = ~held[sample_ids]
    if settings.max_samples is not None:
        kept_rows = np.flatnonzero(~held)[: settings.max_samples]
        train &= sample_ids <= (kept_rows[-1] if len(kept_rows) else -1)
    train_set = ArrowExamples(table, np.flatnonzero(train))
    if not len(train_set):
        raise ConfigError(
            f"{settings.train_file}: no example has target tokens within max_length={settings.max_length}"
        )
    if eval_set is not None:
        with_completion = np.flatnonzero(eval_set.column("has_completion"))
        if len(with_completion) < len(eval_set):
            logger.info(
                "eval: %d held-out prompt(s) without completion left out of the token metrics",
                len(eval_set) - len(with_completion),
            )
        eval_set = ArrowExamples(eval_set.table, eval_set.rows[with_completion]) if len(with_completion) else None
    return train_set, eval_set
