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

The record codec, the writer and the fingerprints live in :mod:`kd_core.topk_store` (``data-gen`` writes stores
too); they are re-exported here. All records have the same size, so a sample's records are one contiguous slice of a
``numpy.memmap``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.losses.topk import TopKTargets
from kd_core import checksum
from kd_core.config import ConfigError
from kd_core.topk_store import (  # noqa: F401 (the store's vocabulary, imported from here by precompute and tests)
    COMPLETION_FINGERPRINT,
    DATA_HASH,
    FORMAT,
    INDEX_HASH,
    META_FILE,
    Codec,
    ShardWriter,
    completion_fingerprint,
    file_hash,
    sample_fingerprint,
    shard_names,
    tokenizer_hash,
    vocab_hash,
    write_meta,
)

# A store precomputed across tokenizers (``distill precompute --student_tokenizer``) holds its teacher's tokenizer here
TEACHER_TOKENIZER_DIR = "teacher_tokenizer"
STUDENT_KEY = "student_tokenizer"  # store.json: the hashes of the student tokenizer such a store was aligned for


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
        # A captured store names each data file data-gen wrote (data.jsonl, data.parquet: the same rows in order).
        if digest != dataset["sha256"] and digest not in dataset.get("alternates", {}).values():
            raise ConfigError(
                f"{self.field}: {meta_file} was built from dataset {dataset['file']} "
                f"(sha256 {dataset['sha256'][:12]}), but data.train_file {train_file} has sha256 {digest[:12]} "
                "(another dataset or version)"
            )
        by_completion = meta.get("fingerprint") == COMPLETION_FINGERPRINT
        for example in examples:
            sample_id = example["sample_id"]
            if sample_id not in self.fingerprints:
                raise ConfigError(
                    f"{self.field}: training sample {sample_id} of {train_file} is not in {self.path} "
                    + (
                        "(a record without captured log-probabilities)"
                        if by_completion
                        else "(different eval split, max_samples or seed than at precompute)"
                    )
                )
            if by_completion:
                self._check_completion(example, train_file)
            elif self.fingerprints[sample_id] != sample_fingerprint(example):
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

    def _check_completion(self, example: dict[str, Any], train_file: str) -> None:
        """A captured store's rows are the teacher's distributions before each generated token: the example's
        counted labels must be exactly those tokens (the data layer trains on a record's completion_token_ids)."""
        labels = np.asarray(example["labels"][1:], dtype=np.int64)
        counted = labels[labels != -100]
        if completion_fingerprint(counted) != self.fingerprints[example["sample_id"]]:
            raise ConfigError(
                f"{self.field}: training sample {example['sample_id']} of {train_file} does not count exactly its "
                f"completion_token_ids ({len(counted)} counted tokens, {self.location[example['sample_id']][2]} "
                "rows in the store): data.max_length cut it, data.completion_only_loss is false, or the record "
                "changed since it was captured"
            )
