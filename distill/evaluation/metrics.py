"""Held-out figures of a student against its teacher: token KL, top-1 agreement, and the student's own loss.

All three are token-level over the counted (completion) tokens: ``kl`` is KL(p_teacher || p_student) at
temperature 1 in nats per token, ``top1_agreement`` the fraction of tokens where both argmaxes agree, ``loss`` the
student's cross-entropy on the labels. Sums are reduced across processes before dividing, so the figures do not
depend on how the eval set is sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import divergences as losses
from kd_core.config import option
from distill.losses.objective import target_positions
from distill.training.runtime import zero3_gathered


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

    from distill.data.datasets import DataSettings, collate, tokenize_records
    from kd_core.records import load_records
    from distill.losses.divergences import shared_vocab_size

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


@dataclasses.dataclass
class AccuracySettings:
    """Answer accuracy of the student on held-out questions: greedy generation, then the answer extractor of
    ``data-gen cot`` (:mod:`kd_core.answers`) against the gold answer."""

    file: str | None = option(None, help="Held-out questions (.jsonl/.json/.parquet, e.g. GSM8K's test split); "
                              "null = no accuracy metric.")
    question_field: str = option("question", help="Column holding the question.")
    answer_field: str = option("answer", help="Column holding the gold answer (the text after '####' if present).")
    prompt_prefix: str = option("", help="Prepended to each question, e.g. '[rationale] ' for a step-by-step student.")
    max_samples: int | None = option(100, help="Evaluate on the first N questions; null = all.")
    max_new_tokens: int = option(256, help="Greedy generation length per answer.")
    batch_size: int = option(16, help="Questions generated together (left-padded).")
    extractor: str = option("answer_is", help="answer_is, hash, final_number or regex (see kd_core.answers).")
    regex: str | None = option(None, help="extractor=regex: the pattern.")
    numeric: bool = option(True, help="Compare answers as numbers.")

    def __post_init__(self) -> None:
        from kd_core.answers import AnswerExtractor

        AnswerExtractor(self.extractor, self.regex, self.numeric)  # a bad kind or pattern fails at config time
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens: expected >= 1 (and batch_size >= 1)")


def load_accuracy_set(settings: AccuracySettings) -> list[tuple[str, str]]:
    """(prompt, gold) pairs; a row without a usable gold answer is a ConfigError naming it."""
    from kd_core.answers import gold_answer
    from kd_core.config import ConfigError
    from kd_core.records import load_records

    records = load_records(settings.file, "accuracy.file")
    if settings.max_samples is not None:
        records = records[: settings.max_samples]
    pairs = []
    for row, record in enumerate(records):
        question, raw = record.get(settings.question_field), record.get(settings.answer_field)
        gold = gold_answer(str(raw), settings.numeric) if raw is not None else None
        if not isinstance(question, str) or gold is None:
            raise ConfigError(f"accuracy.file: {settings.file}: row {row}: needs a '{settings.question_field}' "
                              f"string and a gold '{settings.answer_field}'")
        pairs.append((settings.prompt_prefix + question, gold))
    return pairs


@torch.no_grad()
def answer_accuracy(
    model: nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],
    settings: AccuracySettings,
    reduce=None,
) -> dict[str, float]:
    """Fraction of questions whose greedily generated answer matches the gold one. Prompts go through the chat
    template as a user turn when the tokenizer has one (as training on ``prompt``/``completion`` data does)."""
    from kd_core.answers import AnswerExtractor

    extractor = AnswerExtractor(settings.extractor, settings.regex, settings.numeric)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues right after each prompt
    correct = 0
    try:
        for start in range(0, len(pairs), settings.batch_size):
            chunk = pairs[start : start + settings.batch_size]
            if tokenizer.chat_template is not None:
                ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                                          add_generation_prompt=True, return_dict=False))
                       for p, _ in chunk]
            else:
                ids = [tokenizer(p)["input_ids"] for p, _ in chunk]
            batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
            out = model.generate(**batch, do_sample=False, max_new_tokens=settings.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(extractor.extract(text) == gold for text, (_, gold) in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
    sums = torch.tensor([float(correct), float(len(pairs))], dtype=torch.float64)
    if reduce is not None:
        sums = reduce(sums)
    return {"answer_accuracy": sums[0].item() / max(sums[1].item(), 1.0), "answer_questions": int(sums[1].item())}
