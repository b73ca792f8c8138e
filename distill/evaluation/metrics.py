"""Held-out figures of a student against its teacher: token KL, top-1 agreement, draft alpha, and the student's own
loss.

All are token-level over the counted (completion) tokens: ``kl`` is KL(p_teacher || p_student) at temperature 1 in
nats per token, ``top1_agreement`` the fraction of tokens where both argmaxes agree, ``alpha`` one minus the mean
total variation distance 0.5 * sum |p_teacher - p_student| (the expected share of the student's draft tokens that
speculative sampling with the teacher accepts: Leviathan et al. 2023, DistillSpec), ``loss`` the student's
cross-entropy on the labels. Sums are reduced across processes before dividing, so the figures do not depend on how
the eval set is sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from distill.losses import divergences as losses
from distill.losses.head import OutputHead, output_head
from distill.losses.objective import target_labels, target_positions
from distill.runtime import zero3_gathered
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
    *,
    chunk_size: int,
) -> dict[str, float]:
    """``student``/``teacher`` are plain causal LMs (unwrapped); ``reduce`` sums a tensor across processes;
    ``chunk_size`` is the objective's ``loss.chunk_size``.

    Through the objective's chunked kernels, ``chunk_size`` counted tokens at a time: neither model's full
    ``[tokens, vocab]`` logits ever exist. A batch whose labels are all ``-100`` counts nothing but still runs both
    models (and, under ZeRO-3, the collectives of their forwards and head gathers): how a rank with fewer eval rows
    keeps step with the others."""
    sums = torch.zeros(5, dtype=torch.float64)  # kl, agreement, ce, tokens, total variation
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
        with zero3_gathered(heads, zero3):  # a collective: every rank enters it for every batch
            # Detached and cropped: the kernels would otherwise fill a full fp32 head gradient that eval never uses.
            s_head = frozen(student_head, vocab_size)
            sums[2] += losses.chunked_cross_entropy_sum(student_hidden, s_head, targets, chunk_size).item()
            if teacher is not None:
                t_head = frozen(teacher_head, vocab_size)
                sums[0] += losses.chunked_divergence(
                    student_hidden, s_head, teacher_hidden, t_head, "forward_kl", chunk_size=chunk_size
                ).item()
                sums[1] += top1_agreements(student_hidden, s_head, teacher_hidden, t_head, chunk_size)
                # The registry's own TV row, through the same chunked kernel: no [tokens, vocab] tile beyond a chunk.
                sums[4] += losses.chunked_divergence(
                    student_hidden, s_head, teacher_hidden, t_head, "tvd", chunk_size=chunk_size
                ).item()
        sums[3] += targets.numel()
    if reduce is not None:
        sums = reduce(sums)
    tokens = max(sums[3].item(), 1.0)
    metrics = {"loss": sums[2].item() / tokens, "tokens": int(sums[3].item())}
    if teacher is not None:
        metrics["kl"] = sums[0].item() / tokens
        metrics["top1_agreement"] = sums[1].item() / tokens
        metrics["alpha"] = 1.0 - sums[4].item() / tokens
    return metrics


def frozen(head: OutputHead, vocab: int) -> OutputHead:
    """``head`` cropped to the shared ``vocab`` rows and detached from autograd (evaluation needs no gradient)."""
    bias = head.bias.detach()[:vocab] if head.bias is not None else None
    return dataclasses.replace(head, weight=head.weight.detach()[:vocab], bias=bias)


def top1_agreements(
    student_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_hidden: torch.Tensor,
    teacher_head: OutputHead,
    chunk_size: int,
) -> int:
    """Tokens where both models' most likely next token is the same, ``chunk_size`` tokens at a time (one
    ``[chunk, vocab]`` product per model through its own head, as its lm_head would compute it)."""
    agree = 0
    for start in range(0, student_hidden.shape[0], chunk_size):
        s = student_head.logits(student_hidden[start : start + chunk_size])
        t = teacher_head.logits(teacher_hidden[start : start + chunk_size])
        agree += int((s.argmax(-1) == t.argmax(-1)).sum())
    return agree


@dataclasses.dataclass
class AccuracySettings:
    """Answer accuracy of the student on held-out questions: greedy generation, then the answer extractor of
    ``data-gen cot`` (:mod:`kd_core.answers`) against the gold answer."""

    file: str | None = option(
        None, help="Held-out questions (.jsonl/.json/.parquet, e.g. GSM8K's test split); null = no accuracy metric."
    )
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
    rows = load_questions(
        settings.file,
        "accuracy.file",
        settings.question_field,
        settings.answer_field,
        numeric=settings.extractor.numeric,
        limit=settings.max_samples,
    )
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
