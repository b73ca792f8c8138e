"""Held-out figures during a training run: what ``distill train`` logs as ``eval/...`` every ``eval_steps`` and at
the end.

:class:`Evaluator` holds the held-out data and how to shard it; :meth:`Evaluator.evaluate` takes the plain student
and teacher of the moment. Causal LMs get the token figures of :func:`~distill.evaluation.metrics.token_metrics`
(each process its share of the rows, sums reduced across processes), encoders the embedding figures of
:mod:`distill.evaluation.embedding` (every process the whole set), and with ``accuracy.file`` the answer accuracy.

Under ZeRO-3 every forward and head gather is a collective, so every rank must run the same number of eval batches:
a rank whose share of the rows is shorter pads with batches whose labels are all ``-100`` (they run the models and
count nothing), so the figures are those of a single process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distill.data.datasets import IGNORE_INDEX, TokenizedDataset, collate
from distill.evaluation.embedding import embedding_metrics
from distill.evaluation.metrics import AccuracySettings, answer_accuracy, token_metrics
from kd_core.config import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator


def shard_batches(size: int, batch_size: int, rank: int, processes: int) -> list[tuple[list[int], bool]]:
    """Rank ``rank``'s eval batches over ``size`` rows: ``(rows, counted)``, its rows ``rank, rank + processes,
    ...`` in batches of ``batch_size``, then uncounted batches (of row 0) until it has as many as the rank with the
    most rows: ``ceil(ceil(size / processes) / batch_size)`` on every rank."""
    mine = list(range(rank, size, processes))
    batches = [(mine[j : j + batch_size], True) for j in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(size / processes) / batch_size)
    return batches + [([0], False)] * (most - len(batches))


class Evaluator:
    """The held-out figures of a run: token (or embedding) metrics on ``eval_set``, answer accuracy on
    ``accuracy_pairs``."""

    def __init__(
        self,
        accelerator: Accelerator,
        tokenizer,
        eval_set: TokenizedDataset | None,
        accuracy_pairs: list[tuple[str, str]],
        accuracy: AccuracySettings,
        *,
        batch_size: int,
        vocab_size: int,
        task: str,
        pooling: str,
        chunk_size: int,
        zero3: bool,
    ) -> None:
        self.accelerator, self.tokenizer = accelerator, tokenizer
        self.eval_set, self.accuracy_pairs, self.accuracy = eval_set, accuracy_pairs, accuracy
        self.batch_size, self.vocab_size, self.task = batch_size, vocab_size, task
        self.pooling, self.chunk_size, self.zero3 = pooling, chunk_size, zero3

    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor]:
        acc = self.accelerator
        return lambda t: acc.reduce(t.to(acc.device), "sum").cpu()

    def batches(self, shards: list[tuple[list[int], bool]]) -> Iterator[dict[str, torch.Tensor]]:
        for rows, counted in shards:
            batch = collate([self.eval_set[i] for i in rows], self.tokenizer.pad_token_id)
            if not counted:
                batch["labels"].fill_(IGNORE_INDEX)
            yield {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def answer_accuracy(self, student: nn.Module) -> dict[str, float]:
        """``eval/answer_accuracy`` on ``accuracy.file``: each process generates for its shard, counts are summed."""
        if not self.accuracy_pairs:
            return {}
        if self.zero3:
            raise ConfigError("accuracy.file: generation under ZeRO-3 is not supported; evaluate the exported model")
        acc = self.accelerator
        metrics = answer_accuracy(
            student,
            self.tokenizer,
            self.accuracy_pairs[acc.process_index :: acc.num_processes],
            self.accuracy,
            reduce=self.reduce(),
        )
        return {f"eval/{k}": v for k, v in metrics.items()}

    def evaluate(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, Any]:
        """Every ``eval/...`` figure for the plain ``student`` (put in eval mode for the time of it) and ``teacher``
        (None: the student's own figures only). Every process calls it (it reduces across them)."""
        student.eval()
        try:
            figures = self.answer_accuracy(student)
            if self.eval_set is None:
                return figures
            acc, size = self.accelerator, len(self.eval_set)
            if self.task == "encoder":  # retrieval needs the whole set: every process embeds all of it
                everything = [
                    (list(range(j, min(j + self.batch_size, size))), True) for j in range(0, size, self.batch_size)
                ]
                metrics = (
                    {}
                    if teacher is None
                    else embedding_metrics(student, teacher, self.batches(everything), self.pooling)
                )
            else:
                shards = shard_batches(size, self.batch_size, acc.process_index, acc.num_processes)
                metrics = token_metrics(
                    student,
                    teacher,
                    self.batches(shards),
                    self.vocab_size,
                    reduce=self.reduce(),
                    zero3=self.zero3,
                    chunk_size=self.chunk_size,
                )
            return {**figures, **{f"eval/{k}": v for k, v in metrics.items()}}
        finally:
            student.train()
