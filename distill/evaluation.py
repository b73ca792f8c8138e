"""Held-out figures of a student against its teacher: token KL, top-1 agreement, and the student's own loss.

All three are token-level over the counted (completion) tokens: ``kl`` is KL(p_teacher || p_student) at
temperature 1 in nats per token, ``top1_agreement`` the fraction of tokens where both argmaxes agree, ``loss`` the
student's cross-entropy on the labels. Sums are reduced across processes before dividing, so the figures do not
depend on how the eval set is sharded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from distill import losses
from distill.objective import target_positions


def zero3_gathered(params: list[nn.Parameter], enabled: bool):
    """Gathers ZeRO-3 partitioned parameters for read-only use; a no-op otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def token_metrics(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[dict[str, torch.Tensor]],
    vocab_size: int,
    reduce=None,
    zero3: bool = False,
) -> dict[str, float]:
    """``student``/``teacher`` are plain causal LMs (unwrapped); ``reduce`` sums a tensor across processes."""
    sums = torch.zeros(4, dtype=torch.float64)  # kl, agreement, ce, tokens
    student_head = student.get_output_embeddings().weight
    teacher_head = teacher.get_output_embeddings().weight if teacher is not None else None
    heads = [p for p in (student_head, teacher_head) if p is not None]
    for batch in batches:
        positions = target_positions(batch["labels"])
        targets = batch["labels"][:, 1:][positions[:, :-1]]
        student_hidden = student.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state[positions]
        teacher_hidden = None
        if teacher is not None:
            teacher_hidden = teacher.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state[positions]
        with zero3_gathered(heads, zero3):
            student_logits = (student_hidden @ student_head.t()).float()[:, :vocab_size]
            sums[2] += F.cross_entropy(student_logits, targets, reduction="sum").item()
            if teacher is not None:
                teacher_logits = (teacher_hidden @ teacher_head.t()).float()[:, :vocab_size]
                sums[0] += losses.per_token_divergence(student_logits, teacher_logits, "forward_kl").sum().item()
                sums[1] += (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum().item()
        sums[3] += targets.numel()
    if reduce is not None:
        sums = reduce(sums)
    tokens = max(sums[3].item(), 1.0)
    metrics = {"loss": sums[2].item() / tokens, "tokens": int(sums[3].item())}
    if teacher is not None:
        metrics["kl"] = sums[0].item() / tokens
        metrics["top1_agreement"] = sums[1].item() / tokens
    return metrics


def evaluate_model_dirs(
    student_dir: str | Path,
    teacher_dir: str | Path | None,
    data_file: str | Path,
    max_length: int = 512,
    batch_size: int = 32,
) -> dict[str, float]:
    """Token metrics of a saved student against a saved teacher on a dataset file (single process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.data import DataSettings, collate, load_records, tokenize_records
    from distill.losses import shared_vocab_size

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval() if teacher_dir else None
    vocab = shared_vocab_size(
        student.config.vocab_size, teacher.config.vocab_size if teacher else student.config.vocab_size, len(tokenizer)
    )
    settings = DataSettings(train_file=str(data_file), max_length=max_length)
    dataset = tokenize_records(load_records(data_file, "data file"), tokenizer, settings, str(data_file))
    batches = (
        collate([dataset[i] for i in range(j, min(j + batch_size, len(dataset)))], tokenizer.pad_token_id)
        for j in range(0, len(dataset), batch_size)
    )
    metrics = token_metrics(student, teacher, batches, vocab)
    metrics["student_parameters"] = sum(p.numel() for p in student.parameters())
    if teacher is not None:
        metrics["teacher_parameters"] = sum(p.numel() for p in teacher.parameters())
    return metrics
