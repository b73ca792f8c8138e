"""Held-out figures of a student against its teacher: token KL, top-1 agreement, and the student's own loss.

All three are token-level over the counted (completion) tokens: ``kl`` is KL(p_teacher || p_student) at
temperature 1 in nats per token, ``top1_agreement`` the fraction of tokens where both argmaxes agree, ``loss`` the
student's cross-entropy on the labels. Sums are reduced across processes before dividing, so the figures do not
depend on how the eval set is sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import divergences as losses
from distill.losses.head import output_head
from distill.losses.objective import target_labels, target_positions
from distill.training.runtime import zero3_gathered
from kd_core.answers import AnswerExtractor, load_questions
from kd_core.config import option, section
from kd_core.generation import encode_prompt, generate_batched


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
    # Each model's own head (bias, scale, soft-cap: distill.losses.head), as model(...).logits computes it.
    student_head = output_head(student)
    teacher_head = output_head(teacher) if teacher is not None else None
    heads = student_head.parameters + (teacher_head.parameters if teacher_head is not None else [])
    for batch in batches:
        positions = target_positions(batch["labels"])
        targets = target_labels(batch["labels"], positions)
        student_hidden = student.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state[positions]
        teacher_hidden = None
        if teacher is not None:
            teacher_hidden = teacher.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state[positions]
        with zero3_gathered(heads, zero3):
            student_logits = student_head.logits(student_hidden, vocab_size)
            sums[2] += F.cross_entropy(student_logits, targets, reduction="sum").item()
            if teacher is not None:
                teacher_logits = teacher_head.logits(teacher_hidden, vocab_size)
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
    extractor: AnswerExtractor = section(AnswerExtractor, help="How the final answer is read (kd_core.answers).")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens: expected >= 1 (and batch_size >= 1)")


def load_accuracy_set(settings: AccuracySettings) -> list[tuple[str, str]]:
    """(prompt, gold) pairs (:func:`kd_core.answers.load_questions`: a row without a question or a usable gold answer
    is a ConfigError naming it)."""
    rows = load_questions(settings.file, "accuracy.file", settings.question_field, settings.answer_field,
                          numeric=settings.extractor.numeric, limit=settings.max_samples)
    return [(settings.prompt_prefix + r.question, r.gold) for r in rows]


def answer_accuracy(
    model: nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],
    settings: AccuracySettings,
    reduce=None,
) -> dict[str, float]:
    """Fraction of questions whose greedily generated answer matches the gold one (:mod:`kd_core.generation`:
    prompts go through the chat template as a user turn when the tokenizer has one, as training on
    ``prompt``/``completion`` data does)."""
    prompts = [encode_prompt(tokenizer, prompt) for prompt, _ in pairs]
    generations, _ = generate_batched(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size)
    correct = sum(settings.extractor.extract(g.text) == gold for g, (_, gold) in zip(generations, pairs))
    sums = torch.tensor([float(correct), float(len(pairs))], dtype=torch.float64)
    if reduce is not None:
        sums = reduce(sums)
    return {"answer_accuracy": sums[0].item() / max(sums[1].item(), 1.0), "answer_questions": int(sums[1].item())}
