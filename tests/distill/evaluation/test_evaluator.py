"""Held-out figures through the chunked kernels: the same numbers as full-logit evaluation, and the equal batch
counts per rank that ZeRO-3 needs (padding batches count nothing). The 2-process ZeRO-3 run with eval on is in
tests/distill/training/test_deepspeed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.data.datasets import IGNORE_INDEX, DataSettings, collate, tokenize_records
from distill.evaluation.evaluator import shard_batches
from distill.evaluation.metrics import token_metrics
from distill.losses.divergences import per_token_divergence
from distill.losses.objective import target_labels, target_positions
from kd_core.pretrained import load_causal_lm, load_tokenizer
from tests.conftest import addition_rows


def full_logit_sums(student, teacher, batches, vocab: int) -> torch.Tensor:
    """The figures as evaluation computed them before the kernels: full fp32 [tokens, vocab] logits of both models."""
    sums = torch.zeros(4, dtype=torch.float64)  # kl, agreement, ce, tokens
    with torch.no_grad():
        for batch in batches:
            positions = target_positions(batch["labels"])
            targets = target_labels(batch["labels"], positions)
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[positions]
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[positions]
            s, t = s.float()[:, :vocab], t.float()[:, :vocab]
            sums += torch.tensor(
                [
                    per_token_divergence(s, t, "forward_kl").sum().item(),
                    (s.argmax(-1) == t.argmax(-1)).sum().item(),
                    F.cross_entropy(s, targets, reduction="sum").item(),
                    targets.numel(),
                ],
                dtype=torch.float64,
            )
    return sums


@pytest.fixture(scope="module")
def pair(model_dirs):
    student = load_causal_lm(model_dirs["student"], "model").eval()
    teacher = load_causal_lm(model_dirs["teacher"], "teacher").eval()
    tokenizer = load_tokenizer(model_dirs["student"], "model")
    rows = addition_rows(7)  # uneven lengths: padding must never count
    dataset = tokenize_records(rows, tokenizer, DataSettings(train_file="eval.jsonl", max_length=64), "eval.jsonl")
    return student, teacher, tokenizer, dataset


def batches(dataset, tokenizer, shards):
    for rows, counted in shards:
        batch = collate([dataset[i] for i in rows], tokenizer.pad_token_id)
        if not counted:
            batch["labels"].fill_(IGNORE_INDEX)
        yield batch


@pytest.mark.parametrize("crop", [0, 5])  # the shared vocabulary may be shorter than the heads (padding rows)
def test_chunked_figures_equal_full_logit_evaluation(pair, crop):
    student, teacher, tokenizer, dataset = pair
    vocab = len(tokenizer) - crop
    whole = shard_batches(len(dataset), 3, 0, 1)
    want = full_logit_sums(student, teacher, batches(dataset, tokenizer, whole), vocab)
    # chunk_size 4 does not divide the counted tokens of a batch: the last chunk is short.
    got = token_metrics(student, teacher, batches(dataset, tokenizer, whole), vocab, chunk_size=4)
    tokens = want[3].item()
    assert got["tokens"] == int(tokens) > 0
    assert got["loss"] == pytest.approx(want[2].item() / tokens, rel=1e-5)
    assert got["kl"] == pytest.approx(want[0].item() / tokens, rel=1e-4, abs=1e-6)
    assert got["top1_agreement"] == want[1].item() / tokens
    alone = token_metrics(student, None, batches(dataset, tokenizer, whole), vocab, chunk_size=4)
    assert alone == {"loss": got["loss"], "tokens": got["tokens"]}


def test_alpha_equals_one_minus_the_mean_total_variation_of_full_logits(pair):
    """alpha through the chunked kernel against a direct computation: both models' full softmax over the counted
    tokens, 0.5 * sum |p_t - p_s| per token, averaged, subtracted from 1."""
    student, teacher, tokenizer, dataset = pair
    whole = shard_batches(len(dataset), 3, 0, 1)
    distances, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(dataset, tokenizer, whole):
            positions = target_positions(batch["labels"])
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[positions]
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[positions]
            distances += (0.5 * (s.float().softmax(-1) - t.float().softmax(-1)).abs().sum(-1)).sum().item()
            count += s.shape[0]
    got = token_metrics(student, teacher, batches(dataset, tokenizer, whole), len(tokenizer), chunk_size=4)
    assert 0.0 < got["alpha"] < 1.0
    assert got["alpha"] == pytest.approx(1.0 - distances / count, abs=1e-6)
    itself = token_metrics(teacher, teacher, batches(dataset, tokenizer, whole), len(tokenizer), chunk_size=4)
    assert itself["alpha"] == pytest.approx(1.0, abs=1e-6)


def test_every_rank_gets_the_same_number_of_eval_batches():
    # 5 rows, batch 2, 2 ranks: rank 0 has rows 0, 2, 4 (2 batches), rank 1 rows 1, 3 (1 batch) plus 1 uncounted.
    assert shard_batches(5, 2, 0, 2) == [([0, 2], True), ([4], True)]
    assert shard_batches(5, 2, 1, 2) == [([1, 3], True), ([0], False)]
    for size, batch_size, processes in [(5, 2, 2), (1, 2, 2), (7, 3, 3), (8, 2, 2), (2, 8, 4)]:
        shards = [shard_batches(size, batch_size, rank, processes) for rank in range(processes)]
        assert len({len(s) for s in shards}) == 1, (size, batch_size, processes)
        counted = sorted(i for s in shards for rows, counts in s if counts for i in rows)
        assert counted == list(range(size))


def test_sharded_figures_with_padding_equal_one_process(pair):
    """Each "rank" of 3 evaluates its shard, padded to the longest (7 rows, batch 2: 2 batches each, one of them
    uncounted on rank 2); the summed figures equal one process's: the padding counted nothing."""
    student, teacher, tokenizer, dataset = pair
    vocab = len(tokenizer)
    sums = []
    for rank in range(3):
        shards = shard_batches(len(dataset), 2, rank, 3)
        assert len(shards) == 2
        token_metrics(
            student,
            teacher,
            batches(dataset, tokenizer, shards),
            vocab,
            reduce=lambda t: sums.append(t.clone()) or t,
            chunk_size=4,
        )
    total = sum(sums)
    single = []
    token_metrics(
        student,
        teacher,
        batches(dataset, tokenizer, shard_batches(len(dataset), 2, 0, 1)),
        vocab,
        reduce=lambda t: single.append(t.clone()) or t,
        chunk_size=4,
    )
    torch.testing.assert_close(total, single[0], rtol=1e-6, atol=1e-6)
