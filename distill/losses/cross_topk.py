"""Cross-tokenizer divergences against a store of the teacher's top-k in its OWN vocabulary (offline ULD and GOLD).

``distill precompute --student_tokenizer DIR`` stores, at every student position aligned with a teacher position
(:mod:`distill.data.cross`), the teacher's ``k`` most likely ids of its vocabulary (``Vt`` tokens), their
log-probabilities at the store's temperature, and the log of the mass left outside them (the *tail*).

**The teacher's distribution read from a store** is those ``k`` probabilities plus the tail mass spread evenly over
the other ``Vt - k`` tokens: the least informed completion that keeps the total mass and leaves the ``k`` stored values
the largest (each spread value is the tail's mean, at most the ``k``-th largest probability). ``uld`` and ``gold`` are
then :func:`distill.losses.cross.cross_value_and_grad` against it, unchanged:

- ``uld``: the student's sorted probabilities against the ``k`` stored ones in decreasing order followed by
  ``Vt - k`` equal tail values (zero-padded to the longer vocabulary);
- ``gold``: the exact part reads a matched teacher id's stored value when it is in the top ``k`` and the spread tail
  value otherwise; the ULD part sorts the unmatched tokens as above.

With ``k = Vt`` the tail is empty and both equal the online losses (the parity test). The stored values are
renormalised per row (8-bit quantisation leaves their sum slightly off 1), as the same-tokenizer store's buckets are.
Memory is the online kernel's: one fp32 ``[chunk, Vs]`` and one ``[chunk, Vt]`` tile, never ``[tokens, V]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.losses.cross import EMPTY_LOG, VocabMatch, cross_per_token_divergence, cross_value_and_grad
from distill.losses.divergences import (
    backprop_chunk,
    gradient_accumulators,
    hold_gradients,
    release_gradients,
)
from distill.losses.head import OutputHead, as_head, chain_head, matmul_head, project_into, slope_tile
from distill.losses.kinds import DivergenceSpec
from distill.losses.topk import TopKTargets


def teacher_log_probs(ids: Tensor, logp: Tensor, log_tail: Tensor, vocab: int, out: Tensor | None = None) -> Tensor:
    """``[n, vocab]`` fp32 teacher log-probabilities from stored top-k rows (module docstring), normalised; written
    into ``out`` when given."""
    n, k = ids.shape
    out = torch.empty((n, vocab), dtype=torch.float32, device=ids.device) if out is None else out
    if vocab > k:
        out.copy_((log_tail.float() - math.log(vocab - k)).clamp_min(EMPTY_LOG)[:, None].expand(n, vocab))
    out.scatter_(1, ids, logp.float().clamp_min(EMPTY_LOG))
    return out.sub_(torch.logsumexp(out, 1, keepdim=True))


def cross_topk_per_token(
    student_logits: Tensor, targets: TopKTargets, spec: DivergenceSpec, match: VocabMatch
) -> Tensor:
    """The reference: per-row values ``[n]`` (times ``T**2``) from full student logits ``[n, Vs]``, differentiable
    by autograd; :func:`chunked_cross_topk_divergence` must equal its sum."""
    t = teacher_log_probs(targets.ids, targets.logp, targets.log_tail, match.teacher_vocab)
    # As logits at temperature T: log_softmax(T * t / T) gives the stored distribution back.
    return cross_per_token_divergence(student_logits, t * spec.temperature, spec, match)


class _ChunkedCrossTopK(torch.autograd.Function):
    """Sum over aligned pairs of :func:`cross_value_and_grad` times ``T**2``, the teacher's side rebuilt from the
    store a chunk at a time; the student's gradients are computed in forward (as
    :func:`distill.losses.divergences.pair_chunks` does for the online kernels)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        head: OutputHead,
        targets: TopKTargets,
        spec: DivergenceSpec,
        match: VocabMatch,
    ) -> Tensor:
        inputs = (hidden, weight, bias)
        grads = gradient_accumulators(ctx, *inputs)
        n_rows, chunk, temperature = hidden.shape[0], spec.chunk_size, spec.temperature
        cropped = matmul_head(weight[: match.student_vocab])  # cropped inside the Function: no [V, H] copy
        rows = min(chunk, n_rows)
        s_tile = torch.empty((rows, match.student_vocab), dtype=torch.float32, device=hidden.device)
        t_tile = torch.empty((rows, match.teacher_vocab), dtype=torch.float32, device=hidden.device)
        slope_rows = slope_tile(head, rows, match.student_vocab, hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, n_rows, chunk):
                h = hidden[start : start + chunk]
                n, part = h.shape[0], slice(start, start + chunk)
                slope = None if slope_rows is None else slope_rows[:n]
                z = project_into(s_tile[:n], h, cropped, head, 1.0 / temperature, slope)
                s = torch.log_softmax(z, -1, out=s_tile[:n])
                ids, logp, tail = targets.ids[part], targets.logp[part], targets.log_tail[part]
                t = teacher_log_probs(ids, logp, tail, match.teacher_vocab, t_tile[:n])
                value, grad_z = cross_value_and_grad(s, t, match, spec)
                total += value.sum()
                grad_z = chain_head(grad_z, head, slope, temperature)  # d(T^2 L)/dz = T dL/d(z/T)
                backprop_chunk(grad_z, h, cropped, grads[0], grads[1], start, grads[2])
        hold_gradients(ctx, grads, inputs)
        return total * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*release_gradients(ctx, grad_output), *(None,) * 4)


def chunked_cross_topk_divergence(
    student_hidden: Tensor,
    student_head: Tensor | OutputHead,
    targets: TopKTargets,
    spec: DivergenceSpec,
    match: VocabMatch,
) -> Tensor:
    """SUM over aligned pairs of the cross-tokenizer divergence (``uld`` when ``match`` is empty, else ``gold``)
    against stored top-k rows in the teacher's vocabulary (``match.teacher_vocab`` ids), ``spec.chunk_size`` pairs
    at a time. ``student_hidden [N, H]``: the student's final hidden states at the N aligned positions, in the order
    of the stored rows. Differentiable w.r.t. ``student_hidden`` and the student head's weight and bias."""
    if student_hidden.dim() != 2 or student_hidden.shape[0] != targets.ids.shape[0]:
        raise ValueError(
            f"targets: {targets.ids.shape[0]} stored rows for {tuple(student_hidden.shape)} aligned student states "
            "(the store was built from other alignments)"
        )
    head = as_head(student_head)
    if match.student_vocab > head.weight.shape[0]:
        raise ValueError(f"match: student vocabulary {match.student_vocab} exceeds the head's {head.weight.shape[0]}")
    if targets.ids.numel() and int(targets.ids.max()) >= match.teacher_vocab:
        raise ValueError(f"targets: a stored id is outside the teacher's vocabulary of {match.teacher_vocab}")
    match = match.to(student_hidden.device)
    return _ChunkedCrossTopK.apply(student_hidden, head.weight, head.bias, head, targets, spec, match)
