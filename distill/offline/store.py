"""A compact, memory-mapped store of a teacher's top-k next-token log-probabilities (offline distillation).

Layout of a store directory (written by ``distill precompute``)::

    store.json                    metadata: teacher, tokenizer/vocab hashes, dataset hash, k, temperature, format,
                                  and every shard with its expected byte size and the XXH3-128 checksums of its two
                                  files (verified on open); written LAST, so a store without it is incomplete
    shard-00000-of-00002.bin      fixed-size records, one per counted token (row-major over samples)
    shard-00000-of-00002.idx.npy  int64 [samples, 4]: sample_id, first record, tokens, fingerprint of the sample

Records are keyed by the sample id (the row of the source file, see ``distill.data.datasets``) and the rank of the
counted token within the sample -- never by step or process -- so shuffling, accumulation and any number of processes
read the right rows.

One record (``record_bytes`` bytes) holds the k token ids and their log-probabilities in an ORDER-FREE form (the
divergences only need pairs, not their ranks), plus the log of the tail mass (everything outside the top k):

* ids, sorted ascending, in Elias-Fano form: the low ``l = floor(log2(V / k))`` bits of each id packed at ``l``
  bits, and the high parts as a unary bit vector of ``k + (V - 1 >> l) + 1`` bits. That is about ``l + 2`` bits per
  id (13 at V = 151,936 and k = 50) instead of 17-18 for a plain id in rank order.
* values in the same id order, quantised uniformly on ``[-value_range, 0]`` at ``value_bits`` bits (log-probs below
  ``-value_range`` are clamped: they carry less than ``exp(-value_range)`` probability each).
* the log tail mass as float16 (``-inf`` when k covers the whole vocabulary).

All records have the same size, so a sample's records are one contiguous slice of a ``numpy.memmap``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.tokenized import tokenizer_hash, vocab_hash
from distill.losses.topk import TopKTargets
from kd_core import checksum
from kd_core.atomic import atomic_open, atomic_write_json
from kd_core.config import ConfigError

FORMAT = "distill-topk-v1"
# A store precomputed across tokenizers (``distill precompute --student_tokenizer``) holds its teacher's tokenizer here
TEACHER_TOKENIZER_DIR = "teacher_tokenizer"
STUDENT_KEY = "student_tokenizer"  # store.json: the hashes of the student tokenizer such a store was aligned for
META_FILE = "store.json"
# Keys of a shard's entry in store.json (absent in stores written before checksums: those are checked on sizes only)
DATA_HASH = f"data_{checksum.ALGORITHM}"
INDEX_HASH = f"index_{checksum.ALGORITHM}"


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
# Writing and reading
# ---------------------------------------------------------------------------------------------------------------


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


class LogitStore:
    """Read side: validates every shard against ``store.json`` (size, and the content checksum of its data and index
    files when the store has them: one sequential read of each shard on open) and memory-maps it."""

    def __init__(self, path: str | os.PathLike, field: str = "loss.teacher_store") -> None:
        self.path, self.field = Path(path), field
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise ConfigError(f"{field}: {meta_file} not found (not a store, or its precompute did not finish)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{field}: {meta_file} is not valid JSON ({err})") from None
        if self.meta.get("format") != FORMAT:
            raise ConfigError(f"{field}: {meta_file} has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        c = self.meta["codec"]
        self.codec = Codec(c["vocab"], c["k"], c["value_bits"], c["value_range"])
        self.location: dict[int, tuple[int, int, int]] = {}  # sample_id -> (shard, first row, tokens)
        self.fingerprints: dict[int, int] = {}
        self.shards: list[np.ndarray] = []
        for number, shard in enumerate(self.meta["shards"]):
            self.shards.append(self._open_shard(shard))
            index = self._read_index(shard)
            for sample_id, first, count, fingerprint in index.tolist():
                self.location[sample_id] = (number, first, count)
                self.fingerprints[sample_id] = fingerprint

    def _open_shard(self, shard: dict[str, Any]) -> np.ndarray:
        data = self.path / shard["data"]
        if not data.is_file():
            raise ConfigError(f"{self.field}: shard {data} is missing")
        size = data.stat().st_size
        if size != shard["bytes"]:
            raise ConfigError(
                f"{self.field}: shard {data} has {size} bytes, store.json expects {shard['bytes']} "
                "(truncated or overwritten; run distill precompute again)"
            )
        if DATA_HASH in shard and checksum.file_hash(data) != shard[DATA_HASH]:
            raise ConfigError(
                f"{self.field}: shard {data} does not match its {checksum.ALGORITHM} checksum in store.json "
                "(corrupted in place; run distill precompute again)"
            )
        if size == 0:
            return np.zeros((0, self.codec.record_bytes), dtype=np.uint8)
        return np.memmap(data, dtype=np.uint8, mode="r", shape=(shard["tokens"], self.codec.record_bytes))

    def _read_index(self, shard: dict[str, Any]) -> np.ndarray:
        index_file = self.path / shard["index"]
        if INDEX_HASH in shard and index_file.is_file() and checksum.file_hash(index_file) != shard[INDEX_HASH]:
            raise ConfigError(
                f"{self.field}: shard index {index_file} does not match its {checksum.ALGORITHM} checksum in "
                "store.json (corrupted in place; run distill precompute again)"
            )
        try:
            index = np.load(index_file)
        except (OSError, ValueError, EOFError) as err:
            raise ConfigError(f"{self.field}: shard index {index_file} cannot be read ({err})") from None
        if index.shape != (shard["samples"], 4) or int(index[:, 2].sum()) != shard["tokens"]:
            raise ConfigError(f"{self.field}: shard index {index_file} does not match store.json (truncated?)")
        return index

    @property
    def k(self) -> int:
        return self.codec.k

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    def sample(self, sample_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decoded (ids, logp, log_tail) of one sample's counted tokens."""
        if sample_id not in self.location:
            raise ConfigError(f"{self.field}: sample {sample_id} is not in {self.path} (built from another split?)")
        shard, first, count = self.location[sample_id]
        return self.codec.decode(np.asarray(self.shards[shard][first : first + count]))

    def targets(self, sample_ids: list[int], device: torch.device | str = "cpu") -> TopKTargets:
        """Targets of a batch's samples concatenated in order (matching ``labels``' counted positions row by row)."""
        rows = []
        for sample_id in sample_ids:
            if sample_id not in self.location:
                raise ConfigError(f"{self.field}: sample {sample_id} is not in {self.path}")
            shard, first, count = self.location[sample_id]
            rows.append(np.asarray(self.shards[shard][first : first + count]))
        ids, logp, log_tail = self.codec.decode(np.concatenate(rows) if rows else np.zeros((0, 1), np.uint8))
        return TopKTargets(
            torch.from_numpy(ids).to(device), torch.from_numpy(logp).to(device), torch.from_numpy(log_tail).to(device)
        )

    def check_compatible(
        self, tokenizer, vocab_size: int, temperature: float, train_file: str, examples, teacher_tokenizer=None
    ) -> None:
        """ConfigError naming the store file and what differs, before any training: tokenizer, vocabulary,
        temperature, dataset file, and every training example's tokens. ``teacher_tokenizer``: the store must
        have been precomputed across tokenizers for this student (``tokenizer``), in that teacher's vocabulary
        (``vocab_size``)."""
        meta_file, meta = self.path / META_FILE, self.meta
        self._check_cross(tokenizer, teacher_tokenizer)
        tokenizer = tokenizer if teacher_tokenizer is None else teacher_tokenizer  # the vocabulary stored
        if meta["vocab_sha256"] != vocab_hash(tokenizer):
            raise ConfigError(
                f"{self.field}: {meta_file} was built with another vocabulary (teacher {meta['teacher']['path']}); "
                "the student's tokenizer must be the one the store was precomputed with"
            )
        if meta["tokenizer_sha256"] != tokenizer_hash(tokenizer):
            raise ConfigError(
                f"{self.field}: {meta_file} was built with a tokenizer that differs from the student's "
                "(same vocabulary, different chat template or special tokens)"
            )
        if self.codec.vocab != vocab_size:
            raise ConfigError(
                f"{self.field}: {meta_file} has vocabulary size {self.codec.vocab}, the student {vocab_size}"
            )
        if not math.isclose(self.temperature, temperature):
            raise ConfigError(
                f"{self.field}: {meta_file} holds log-probabilities at temperature {self.temperature}, "
                f"but loss.temperature is {temperature}"
            )
        dataset = meta["dataset"]
        digest = file_hash(train_file)
        if digest != dataset["sha256"]:
            raise ConfigError(
                f"{self.field}: {meta_file} was built from dataset {dataset['file']} "
                f"(sha256 {dataset['sha256'][:12]}), but data.train_file {train_file} has sha256 {digest[:12]} "
                "(another dataset or version)"
            )
        for example in examples:
            sample_id = example["sample_id"]
            if sample_id not in self.fingerprints:
                raise ConfigError(
                    f"{self.field}: training sample {sample_id} of {train_file} is not in {self.path} "
                    "(different eval split, max_samples or seed than at precompute)"
                )
            if self.fingerprints[sample_id] != sample_fingerprint(example):
                raise ConfigError(
                    f"{self.field}: training sample {sample_id} tokenizes differently than when {self.path} was built "
                    "(data.max_length, data.format or data.completion_only_loss changed?)"
                )

    def _check_cross(self, student, teacher_tokenizer) -> None:
        """A store in the teacher's vocabulary only across tokenizers, for the student it was aligned with."""
        meta_file, built_for = self.path / META_FILE, self.meta.get(STUDENT_KEY)
        if teacher_tokenizer is None and built_for is not None:
            raise ConfigError(
                f"{self.field}: {meta_file} holds the teacher's top-k in its own vocabulary (precomputed across "
                "tokenizers); train from it with loss.cross_tokenizer (uld or gold)"
            )
        if teacher_tokenizer is None:
            return
        if built_for is None:
            raise ConfigError(
                f"{self.field}: {meta_file} was not precomputed across tokenizers; with loss.cross_tokenizer "
                "precompute the store with --student_tokenizer <the student>"
            )
        if (built_for["vocab_sha256"], built_for["tokenizer_sha256"]) != (vocab_hash(student), tokenizer_hash(student)):
            raise ConfigError(
                f"{self.field}: {meta_file} was aligned for another student tokenizer ({built_for['path']}); "
                "its positions do not match this student's tokens: precompute it with --student_tokenizer "
                "<this student>"
            )


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """store.json, atomically: its presence marks a complete store."""
    atomic_write_json(directory / META_FILE, meta)
