"""One optimizer step of ``distill train``, top to bottom: :func:`training_step`.

The step's micro-batches (with completions sampled by the student or the teacher where ``on_policy`` says so,
:mod:`distill.training.on_policy`), the teacher signal's targets (:mod:`distill.training.teacher`), the student
module returning its loss terms already normalised by the tokens of the full optimizer step, their weighted sum,
backward, clipping, the optimizer and schedule, the sparsity masks. The functions take the run
(:class:`distill.training.loop.Distiller`) whose state they advance.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from distill.data import cross
from distill.data.datasets import collate
from distill.data.packing import collate_packed, varlen_attention
from distill.losses.objective import TeacherTargets, step_token_scale, target_labels, target_positions
from distill.runtime import inner
from distill.training.on_policy import OFF_POLICY, REPLAY, STUDENT, unwrapped_for_generation
from distill.training.teacher import CrossTargets, TeacherSignal


def next_micro_batches(run) -> tuple[list[dict[str, torch.Tensor]], list[str], list[dict[str, float]]]:
    """The step's micro-batches, where each one's completions came from (:mod:`distill.training.on_policy`), and
    the sampling figures of each."""
    cfg = run.cfg
    batches, sources, stats = [], [], []
    for _ in range(cfg.gradient_accumulation_steps):
        examples = [run.train_set[i] for i in run.stream.next_indices()]
        source, figures = OFF_POLICY, {}
        if run.sampler is not None:
            source = run.sampler.draw(len(examples))
            if source == REPLAY:
                examples, figures = run.sampler.replay(len(examples))
            elif source != OFF_POLICY:
                examples, figures = sample(run, examples, source)
            if source != OFF_POLICY and run.cross_tokenizer is not None:
                # The teacher's tokens of each sample, recomputed from the sample alone (replayed and resumed
                # samples get the same): the buffer and checkpoints keep the student's side only.
                teacher_tokenizer, max_length = run.cross_tokenizer.tokenizer, cfg.data.max_length
                examples = [
                    {**e, **cross.sampled_columns(e, run.tokenizer, teacher_tokenizer, max_length)} for e in examples
                ]
        batches.append({k: v.to(run.accelerator.device) for k, v in build_batch(run, examples).items()})
        if run.teacher is not None:  # a served teacher scores it while the next micro-batches are sampled
            run.teacher.prefetch(batches[-1])
        sources.append(source)
        stats.append(figures)
    return batches, sources, stats


def build_batch(run, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A micro-batch's tensors, on the CPU."""
    cfg, pad = run.cfg, run.tokenizer.pad_token_id
    if cfg.data.packing:
        attention = varlen_attention(cfg.model.attn_implementation)
        return collate_packed(examples, pad, cfg.data.max_length, run.packing_weight, attention)
    return collate(examples, pad)


def upcoming_batches(run) -> list[dict[str, torch.Tensor]]:
    """The next step's micro-batches that are certain before this step trains: those of the dataset's own
    completions (:meth:`~distill.training.on_policy.Sampler.upcoming`), as the next step will build them from the
    data stream (peeked: the position does not move); none when this step is the last."""
    count = run.cfg.gradient_accumulation_steps
    if run.step + 1 >= run.total_steps:
        return []
    sources = run.sampler.upcoming(count) if run.sampler is not None else [OFF_POLICY] * count
    return [
        build_batch(run, [run.train_set[i] for i in run.stream.peek_indices(ahead)])
        for ahead, source in enumerate(sources)
        if source == OFF_POLICY
    ]


def sample(run, examples: list[dict[str, Any]], source: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The examples with completions sampled by the student or the teacher (weights gathered under ZeRO-3, so
    every rank generates on its own: no ``synced_gpus``)."""
    prepared = run.module if source == STUDENT else run.teacher.prepared
    with unwrapped_for_generation(prepared, run.accelerator) as model:
        model = model.student if source == STUDENT else model
        return run.sampler.sample(model, examples, run.tokenizer, run.cfg.data.max_length, source)


def teacher_targets(
    teacher: TeacherSignal | None, batch: dict[str, torch.Tensor]
) -> contextlib.AbstractContextManager[TeacherTargets | None]:
    """The teacher's side of a micro-batch (see :class:`TeacherSignal`); None without a teacher."""
    return teacher.targets(batch) if teacher is not None else contextlib.nullcontext()


def training_step(run) -> dict[str, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the step's term values (summed
    over ranks: each rank adds its share of the mean)."""
    acc, cfg = run.accelerator, run.cfg
    weights = cfg.loss.weights_at(run.step, run.total_steps)
    micro_batches, sources, sampling = run.next_micro_batches()
    if run.teacher is not None and run.teacher.speculates:  # scored while this step trains
        run.teacher.speculate(upcoming_batches(run))
    logged: dict[str, float] = {}
    token_scale = step_token_scale(
        [b["labels"] for b in micro_batches],
        lambda t: acc.reduce(t.to(acc.device), reduction="sum"),
        acc.num_processes,
        cfg.gradient_accumulation_steps,
    )
    share = 1.0 / (acc.num_processes * cfg.gradient_accumulation_steps)
    teacher_logprobs: list[tuple[float, int]] = []
    for batch, source in zip(micro_batches, sources):
        if run.teacher is not None:  # every rank waits for this micro-batch's served targets; all learn together
            run.teacher.settle(batch)  # whether any rank lost the server, before the same forward
        with acc.accumulate(run.module):
            with run.teacher_targets(batch) as teacher:
                terms = run.module(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["labels"],
                    teacher=teacher,
                    loss_weights=batch["loss_weights"],
                    token_scale=token_scale,
                    position_ids=batch.get("position_ids"),
                )
                if source in (STUDENT, REPLAY) and (run.step + 1) % cfg.logging_steps == 0:
                    teacher_logprobs.extend(teacher_logprob(teacher, batch["labels"], cfg.loss.chunk_size))
            loss = sum(weights[k] * v for k, v in terms.items())
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(run.module.parameters(), cfg.max_grad_norm)
            run.optimizer.step()
            if acc.sync_gradients:  # once per optimizer step, whatever the number of processes
                run.scheduler.step()
            run.optimizer.zero_grad()
            if acc.sync_gradients and len(run.masks):
                run.masks.apply(inner(run.module).student)  # pruned zeros stay zero
        for k, v in terms.items():  # per-step value: token terms sum to the step mean, others average
            logged[k] = logged.get(k, 0.0) + v.detach().item() * share
        logged["loss"] = logged.get("loss", 0.0) + loss.detach().item() / (
            acc.num_processes * cfg.gradient_accumulation_steps
        )
    if cfg.loss.terms_at_end is not None:  # the schedule's weights, for the logs and train_terms.png
        logged.update({f"weight/{k}": w / acc.num_processes for k, w in weights.items()})
    if run.teacher is not None:
        logged.update(run.teacher.figures())
    if run.sampler is not None:  # every rank has the same sources, so the same keys
        logged.update(on_policy_figures(sources, sampling, teacher_logprobs, acc.num_processes))
    totals = acc.reduce(torch.tensor(list(logged.values()), dtype=torch.float64, device=acc.device), "sum")
    return dict(zip(logged, totals.tolist()))


def teacher_logprob(teacher, labels: torch.Tensor, chunk_size: int) -> list[tuple[float, int]]:
    """The teacher's summed log-probability of a micro-batch's sampled tokens and their count (logged on logging
    steps; it needs the teacher's logits, so nothing with feature terms only)."""
    if teacher is None or getattr(teacher, "head", None) is None or isinstance(teacher, CrossTargets):
        return []  # across tokenizers the teacher scores its own tokens, not the student's labels
    positions = target_positions(labels)
    targets = target_labels(labels, positions)
    return [(-teacher.label_nll_sum(positions, targets, chunk_size), int(positions.sum()))]


def on_policy_figures(
    sources: list[str], sampling: list[dict[str, float]], teacher_logprobs: list[tuple[float, int]], processes: int
) -> dict[str, float]:
    """A step's sampling figures as this rank's share of the all-rank mean (the step's values are summed over
    ranks): sampled fraction, seconds spent sampling, mean sampled length, student and teacher log-probabilities per
    sampled token (the teacher's on logging steps only)."""
    figures = {"on_policy/sampled_fraction": sum(s != OFF_POLICY for s in sources) / len(sources) / processes}
    sampled = [f for f in sampling if f]
    if sampled:
        figures["on_policy/sample_seconds"] = sum(f["on_policy/sample_seconds"] for f in sampled) / processes
        for key in ("on_policy/sampled_length", "on_policy/student_logprob"):
            values = [f[key] for f in sampled if key in f]
            if values:
                figures[key] = sum(values) / len(values) / processes
    if teacher_logprobs:
        tokens = sum(n for _, n in teacher_logprobs)
        figures["on_policy/teacher_logprob"] = sum(lp for lp, _ in teacher_logprobs) / max(tokens, 1) / processes
    return figures
