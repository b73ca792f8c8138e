"""Segments: the pieces ``distill precompute`` commits one by one, so that a killed run keeps its finished work.

The training set (in the order :func:`distill.data.datasets.build_datasets` gives it: fixed by the data settings and
the seed) is cut into segments of ``segment_samples`` examples; segment ``s`` holds examples ``[s * S, (s + 1) * S)``.
Pending segments are dealt round-robin to the processes, and each is computed in batches of ``batch_size`` counted
from its first example, so its bytes do not depend on which process computed it, nor on how many there were.

A segment is committed by three atomic writes (:mod:`kd_core.atomic`), in this order::

    segment-000003.bin       its records (streamed into a temporary file, fsynced, renamed)
    segment-000003.idx.npy   its index, as a shard's: int64 [samples, 4] (sample_id, first record, tokens, fingerprint)
    segment-000003.json      the commit record: its span, counts and the checksums of the two files above

The record is the commit: a segment without one (its run was killed while writing it) is computed again. Each
record becomes one shard entry of ``store.json``, so :class:`distill.offline.store.LogitStore` reads a segmented
store as it reads any other.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from distill.offline.store import DATA_HASH, INDEX_HASH, Codec
from kd_core import checksum
from kd_core.atomic import atomic_open, atomic_write_bytes, atomic_write_json

# One sample's targets as the writer takes them: sample_id, fingerprint, ids [n, k], logp [n, k], log_tail [n].
Sample = tuple[int, int, np.ndarray, np.ndarray, np.ndarray]


def names(number: int) -> tuple[str, str, str]:
    """The data, index and commit-record file names of segment ``number``."""
    stem = f"segment-{number:06d}"
    return f"{stem}.bin", f"{stem}.idx.npy", f"{stem}.json"


def spans(count: int, size: int) -> list[range]:
    """The example positions of every segment of a training set of ``count`` examples."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def write(directory: Path, number: int, span: range, codec: Codec, samples: Iterable[Sample]) -> dict[str, Any]:
    """Encodes ``samples`` (the span's examples, in order) into segment ``number`` and commits it; returns its
    record. Memory stays one batch: records go to the data file as they come, only the index is kept."""
    encoded = (
        (sample_id, fingerprint, ids.shape[0], codec.encode(ids, logp, log_tail).tobytes())
        for sample_id, fingerprint, ids, logp, log_tail in samples
    )
    return write_encoded(directory, number, span, codec, encoded)


def write_encoded(
    directory: Path, number: int, span: range, codec: Codec, rows: Iterable[tuple[int, int, int, bytes]]
) -> dict[str, Any]:
    """Commits segment ``number`` from already encoded samples (sample_id, fingerprint, tokens, record bytes), in
    the span's order: a served teacher's rows arrive encoded in their journal (:mod:`distill.offline.served`)."""
    data_name, index_name, record_name = names(number)
    index: list[tuple[int, int, int, int]] = []
    rows_written, digest = 0, checksum.hasher()
    with atomic_open(directory / data_name, "wb") as handle:
        for sample_id, fingerprint, tokens, data in rows:
            handle.write(data)
            digest.update(data)
            index.append((sample_id, rows_written, tokens, fingerprint))
            rows_written += tokens
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(index, dtype=np.int64).reshape(-1, 4))
    atomic_write_bytes(directory / index_name, buffer.getvalue())
    record = {
        "data": data_name,
        "index": index_name,
        "first": span.start,
        "stop": span.stop,
        "samples": len(index),
        "tokens": rows_written,
        "bytes": rows_written * codec.record_bytes,
        DATA_HASH: digest.hexdigest(),
        INDEX_HASH: checksum.bytes_hash(buffer.getvalue()),
    }
    atomic_write_json(directory / record_name, record)  # the commit
    return record


def read_record(directory: Path, number: int) -> dict[str, Any]:
    return json.loads((directory / names(number)[2]).read_text())


def _valid(directory: Path, number: int, span: range, codec: Codec, expected: Callable[[range], np.ndarray]) -> bool:
    """Whether segment ``number`` is committed and whole: its record names ``span``, its files have the recorded
    sizes and checksums, and its index lists the current examples of the span (ids and fingerprints)."""
    data_name, index_name, record_name = names(number)
    try:
        record = read_record(directory, number)
        whole = (
            (record["first"], record["stop"]) == (span.start, span.stop)
            and (directory / data_name).stat().st_size == record["bytes"] == record["tokens"] * codec.record_bytes
            and checksum.file_hash(directory / index_name) == record[INDEX_HASH]
            and checksum.file_hash(directory / data_name) == record[DATA_HASH]
        )
        return whole and np.array_equal(np.load(directory / index_name)[:, [0, 3]], expected(span))
    except (OSError, ValueError, KeyError, TypeError, IndexError):  # absent or damaged: not committed
        return False


def pending(
    directory: Path, all_spans: list[range], codec: Codec, expected: Callable[[range], np.ndarray]
) -> list[int]:
    """Main process, before any process writes: the segments still to compute. Committed, whole segments are kept;
    the files of every other segment, and writers' temporaries (``kill -9`` leftovers), are removed."""
    for stale in directory.glob(".*.tmp"):  # this process holds the directory's lock: no other writer's temporary
        stale.unlink(missing_ok=True)
    todo = []
    for number, span in enumerate(all_spans):
        if not _valid(directory, number, span, codec, expected):
            todo.append(number)
            for name in names(number)[::-1]:  # the commit record first: a half-removed segment is never trusted
                (directory / name).unlink(missing_ok=True)
    return todo
