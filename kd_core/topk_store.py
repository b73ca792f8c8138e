"""The top-k store's format, shared by the stages that write one: a teacher's top-k next-token log-probabilities in
fixed-size records, keyed by sample.

``distill precompute`` (a local or served teacher scoring a dataset) and ``data-gen`` with ``teacher.logprobs`` (the
log-probabilities a served teacher returned while it wrote the data) both write it; ``distill train`` reads it
(:class:`distill.offline.store.LogitStore`, where the layout of a store directory is described). It lives here, below
both, so that imports keep running one way.

One record (``record_bytes`` bytes) holds the k token ids and their log-probabilities in an ORDER-FREE form (the
divergences only need pairs, not their ranks), plus the log of the tail mass (everything outside the top k):

* ids, sorted ascending, in Elias-Fano form: the low ``l = floor(log2(V / k))`` bits of each id packed at ``l``
  bits, and the high parts as a unary bit vector of ``k + (V - 1 >> l) + 1`` bits. That is about ``l + 2`` bits per
  id (13 at V = 151,936 and k = 50) instead of 17-18 for a plain id in rank order.
* values in the same id order, quantised uniformly on ``[-value_range, 0]`` at ``value_bits`` bits (log-probs below
  ``-value_range`` are clamped: they carry less than ``exp(-value_range)`` probability each).
* the log tail mass as float16 (``-inf`` when k covers the whole vocabulary).

A sample's fingerprint says what its rows were computed for: :func:`sample_fingerprint` (the tokenized example's
ids and labels: precompute) or :func:`completion_fingerprint` (the completion's token ids alone: a capture, written
before any student tokenizer settings are known; ``store.json`` then says ``"fingerprint": "completion"``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd_core import checksum
from kd_core.atomic import atomic_open, atomic_write_json

FORMAT = "distill-topk-v1"
META_FILE = "store.json"
# Keys of a shard's entry in store.json (absent in stores written before checksums: those are checked on sizes only)
DATA_HASH = f"data_{checksum.ALGORITHM}"
INDEX_HASH = f"index_{checksum.ALGORITHM}"
# store.json's "fingerprint" of a store whose samples are fingerprinted by their completion ids alone
COMPLETION_FINGERPRINT = "completion"


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints: what a store was built from
# ---------------------------------------------------------------------------------------------------------------


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a dataset file, or of every file (with its relative name) of a dataset folder."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def sample_fingerprint(example: dict[str, Any]) -> int:
    """64-bit fingerprint of a tokenized example (ids and labels, and across tokenizers the teacher's ids and the
    aligned positions): catches a changed max_length, chat template or masking even when the file is unchanged."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray(example["input_ids"], dtype=np.int64).tobytes())
    digest.update(np.asarray(example["labels"], dtype=np.int64).tobytes())
    for column in ("teacher_input_ids", "align_student", "align_teacher"):  # across tokenizers: the alignment too
        if column in example:
            digest.update(np.asarray(example[column], dtype=np.int64).tobytes())
    return int(np.frombuffer(digest.digest(), dtype=np.int64)[0])


def completion_fingerprint(token_ids: Sequence[int]) -> int:
    """64-bit fingerprint of a completion's token ids: the rows of a captured sample are the teacher's distributions
    before each of them, so a training example matches its rows exactly when its counted labels are these ids."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return int(np.frombuffer(digest.digest(), dtype=np.int64)[0])


# ---------------------------------------------------------------------------------------------------------------
# The record codec
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """Encodes/decodes fixed-size records for a vocabulary size ``vocab``, ``k`` ids and ``value_bits``."""

    vocab: int
    k: int
    value_bits: int = 8
    value_range: float = 16.0

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.vocab:
            raise ValueError(f"k: expected 1 <= k <= vocabulary size {self.vocab}, got {self.k}")
        if not 2 <= self.value_bits <= 16:
            raise ValueError(f"value_bits: expected 2..16, got {self.value_bits}")
        if not self.value_range > 0:
            raise ValueError(f"value_range: expected > 0, got {self.value_range}")

    @property
    def low_bits(self) -> int:
        return max(0, int(math.floor(math.log2(self.vocab / self.k))))

    @property
    def upper_bits(self) -> int:
        return self.k + ((self.vocab - 1) >> self.low_bits) + 1

    @property
    def packed_bits(self) -> int:
        return self.upper_bits + self.k * (self.low_bits + self.value_bits)

    @property
    def record_bytes(self) -> int:
        return (self.packed_bits + 7) // 8 + 2  # + float16 log tail mass

    def encode(self, ids: np.ndarray, logp: np.ndarray, log_tail: np.ndarray) -> np.ndarray:
        """ids/logp ``[N, k]`` (any order, ids distinct per row), log_tail ``[N]`` -> uint8 ``[N, record_bytes]``."""
        n, k = ids.shape
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids.astype(np.int64), order, axis=1)
        logp = np.take_along_axis(logp.astype(np.float32), order, axis=1)
        lb = self.low_bits
        bits = np.zeros((n, self.packed_bits), dtype=np.uint8)
        # Upper half: bit (high_i + i) set for the i-th smallest id -- a strictly increasing set of positions.
        bits[np.arange(n)[:, None], (ids >> lb) + np.arange(k)] = 1
        start = self.upper_bits
        if lb:
            low = ids & ((1 << lb) - 1)
            bits[:, start : start + k * lb] = ((low[:, :, None] >> np.arange(lb - 1, -1, -1)) & 1).reshape(n, k * lb)
        start += k * lb
        levels = (1 << self.value_bits) - 1
        scaled = (np.clip(logp, -self.value_range, 0.0) + self.value_range) * (levels / self.value_range)
        codes = np.rint(scaled).astype(np.int64)
        b = self.value_bits
        bits[:, start:] = ((codes[:, :, None] >> np.arange(b - 1, -1, -1)) & 1).reshape(n, k * b)
        packed = np.packbits(bits, axis=1)
        tail = log_tail.astype(np.float16).reshape(n, 1).view(np.uint8)
        return np.concatenate([packed, tail], axis=1)

    def decode(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 ``[N, record_bytes]`` -> ids int64 ``[N, k]`` (ascending), logp float32 ``[N, k]``,
        log_tail ``[N]``."""
        n, k, lb, b = records.shape[0], self.k, self.low_bits, self.value_bits
        body = np.ascontiguousarray(records[:, :-2])
        bits = np.unpackbits(body, axis=1, count=self.packed_bits)
        upper = bits[:, : self.upper_bits]
        rows, cols = np.nonzero(upper)  # row-major: each row's k set bits, in increasing position
        if rows.shape[0] != n * k:
            raise ValueError("corrupt record: the id bit vector does not hold k ids")
        ids = (cols.reshape(n, k) - np.arange(k)) << lb
        start = self.upper_bits
        if lb:
            low = bits[:, start : start + k * lb].reshape(n, k, lb).astype(np.int64)
            ids |= (low << np.arange(lb - 1, -1, -1)).sum(-1)
        start += k * lb
        codes = (bits[:, start:].reshape(n, k, b).astype(np.int64) << np.arange(b - 1, -1, -1)).sum(-1)
        logp = codes.astype(np.float32) * (self.value_range / ((1 << b) - 1)) - self.value_range
        log_tail = np.ascontiguousarray(records[:, -2:]).view(np.float16).reshape(n).astype(np.float32)
        return ids, logp, log_tail


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def vocab_hash(tokenizer) -> str:
    """sha256 of the token -> id map (what the ids in the store mean)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary plus everything else that changes tokenization of chat data."""
    extra = {
        "vocab": vocab_hash(tokenizer),
        "chat_template": tokenizer.chat_template,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "class": type(tokenizer).__name__,
    }
    return hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()


def shard_names(rank: int, world: int) -> tuple[str, str]:
    stem = f"shard-{rank:05d}-of-{world:05d}"
    return f"{stem}.bin", f"{stem}.idx.npy"


class ShardWriter:
    """Appends samples' records to one shard (one process writes one shard); ``close`` writes its index."""

    def __init__(self, directory: Path, rank: int, world: int, codec: Codec) -> None:
        self.codec = codec
        self.data_name, self.index_name = shard_names(rank, world)
        self.directory = directory
        self.handle = open(directory / self.data_name, "wb")
        self.index: list[tuple[int, int, int, int]] = []
        self.rows = 0
        self.data_digest = checksum.hasher()  # hashed while writing: the shard is never read back
        self.index_digest: str | None = None

    def add(self, sample_id: int, fingerprint: int, ids: np.ndarray, logp: np.ndarray, log_tail: np.ndarray) -> None:
        records = self.codec.encode(ids, logp, log_tail)
        data = records.tobytes()
        self.handle.write(data)
        self.data_digest.update(data)
        self.index.append((sample_id, self.rows, records.shape[0], fingerprint))
        self.rows += records.shape[0]

    def close(self) -> dict[str, Any]:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(self.index, dtype=np.int64).reshape(-1, 4))
        self.index_digest = checksum.bytes_hash(buffer.getbuffer())
        with atomic_open(self.directory / self.index_name, "wb") as handle:  # the name already ends in .npy
            handle.write(buffer.getbuffer())
        return self.describe()

    def describe(self) -> dict[str, Any]:
        return {
            "data": self.data_name,
            "index": self.index_name,
            "samples": len(self.index),
            "tokens": self.rows,
            "bytes": self.rows * self.codec.record_bytes,
            DATA_HASH: self.data_digest.hexdigest(),
            INDEX_HASH: self.index_digest,
        }


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """store.json, atomically: its presence marks a complete store."""
    atomic_write_json(directory / META_FILE, meta)
