"""Divergences against precomputed top-k teacher targets (offline distillation), with a tail bucket.

The store keeps, per token, the teacher's k most likely ids with their log-probabilities and the log of the mass
left outside them (the *tail*). Both distributions are collapsed onto the same k + 1 buckets -- the k ids, and
"everything else" -- and every kind of :mod:`distill.losses.divergences` is computed between the two bucketed
distributions:

    p = (p_t[i_1], ..., p_t[i_k], tail_t)      q = (p_s[i_1], ..., p_s[i_k], 1 - sum_j p_s[i_j])

All six kinds (forward/reverse KL, generalized JSD, skew forward/reverse KL, TVD) are f-divergences, so by the
data-processing inequality the bucketed value is a lower bound of the full-vocabulary one, with equality when
k = V (the tail is empty) and when both distributions agree in shape inside the tail. ``docs/offline.md`` has the
measured gap per k.

Normalisation is the online losses': the function returns a SUM over tokens (``T**2`` included) that the trainer
divides by the step's token count. The teacher values are already at the store's temperature; the student logits
are divided by the same temperature here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.losses import divergences as losses
from distill.losses.head import OutputHead, as_head, chain_head, matmul_head, project_into, slope_tile
from distill.losses.kinds import DivergenceSpec, as_spec

# log(0) stand-in: losses.per_token_divergence expects finite logits, and exp(-1e4) is exactly 0 in fp32, so an
# empty bucket (the tail when k = V) contributes exactly 0 instead of 0 * inf = NaN.
LOG_ZERO = -1.0e4


@dataclasses.dataclass
class TopKTargets:
    """Teacher targets of the counted tokens of a batch, in the trainer's row-major order of counted positions (what
    :class:`distill.offline.store.LogitStore` reads back; it lives here, with the terms that consume it, so that
    losses never import storage)."""

    ids: Tensor  # [N, k] int64
    logp: Tensor  # [N, k] float32, log-probabilities at the store's temperature
    log_tail: Tensor  # [N] float32, log of the probability mass outside the k ids (-inf if none)


def teacher_buckets(logp: Tensor, log_tail: Tensor) -> Tensor:
    """``[N, k + 1]`` normalised teacher log-probabilities (quantisation can leave the stored sum slightly off 1)."""
    buckets = torch.cat([logp.float(), log_tail.float()[:, None]], dim=1).clamp_min(LOG_ZERO)
    return buckets - torch.logsumexp(buckets, dim=1, keepdim=True)


def student_buckets(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """``[N, k + 1]`` student log-probabilities of the k ids and of the rest, from full ``[N, V]`` logits."""
    z = logits.float() / temperature
    log_norm = torch.logsumexp(z, dim=1, keepdim=True)
    picked = z.gather(1, ids) - log_norm
    # The tail's log-mass from the logits themselves (masking the k ids), not log(1 - sum exp(picked)), which
    # cancels catastrophically when the top k hold nearly all the mass.
    rest = torch.logsumexp(z.scatter(1, ids, float("-inf")), dim=1, keepdim=True) - log_norm
    return torch.cat([picked, rest], dim=1).clamp_min(LOG_ZERO)


def topk_per_token(
    student_logits: Tensor, targets: TopKTargets, kind: str | DivergenceSpec, **options: float
) -> Tensor:
    """Per-token bucketed divergence ``[N]`` (times ``T**2``) of student logits ``[N, V]`` against the targets
    (``kind``: a :class:`~distill.losses.kinds.DivergenceSpec`, or a kind name with its other fields as keywords)."""
    spec = as_spec(kind, options)
    s = student_buckets(student_logits, targets.ids, spec.temperature)
    t = teacher_buckets(targets.logp, targets.log_tail)
    # Bucket log-probabilities are valid logits (log_softmax leaves them unchanged); the temperature is applied.
    at_one = dataclasses.replace(spec, temperature=1.0)
    return losses.per_token_divergence(s, t, at_one) * spec.temperature**2


class _ChunkedTopK(torch.autograd.Function):
    """Sum of bucketed divergences from hidden states, with the gradient computed in forward (as
    :class:`distill.losses.divergences._ChunkedDivergence` does for the online losses), so backward recomputes nothing.

    Per chunk, one fp32 ``[n, V]`` tile holds the logits, then the tail's softmax, then the logit gradient. With
    bucket logits ``b = (z[i_1], ..., z[i_k], logsumexp of z outside the ids)``, the student's bucket distribution
    is ``softmax(b)``, so ``dL/dz`` is ``dL/db_j`` at id ``i_j`` and ``dL/db_tail * softmax_tail(z)`` elsewhere.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        head: OutputHead,
        ids: Tensor,
        logp: Tensor,
        log_tail: Tensor,
        spec: DivergenceSpec,
        vocab: int,
    ) -> Tensor:
        chunk_size, temperature, row = spec.chunk_size, spec.temperature, spec.row
        grads = losses.gradient_accumulators(ctx, hidden, weight, bias)
        inputs = (hidden, weight, bias)
        # Cropped inside the Function, so autograd gets the full-size gradient without a copy.
        cropped = matmul_head(weight[:vocab])
        n_tokens, n_rows = hidden.shape[0], min(chunk_size, hidden.shape[0])
        tile = torch.empty((n_rows, vocab), dtype=torch.float32, device=hidden.device)
        slope_rows = slope_tile(head, n_rows, vocab, hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        mixture = row.needs_second_scratch(spec.beta)
        with torch.no_grad():
            for start in range(0, n_tokens, chunk_size):
                rows = slice(start, start + chunk_size)
                h, chunk_ids = hidden[rows], ids[rows]
                slope = None if slope_rows is None else slope_rows[: h.shape[0]]
                z = project_into(tile[: h.shape[0]], h, cropped, head, 1.0 / temperature, slope)
                picked = z.gather(1, chunk_ids)
                # The tail: softmax over the ids not stored, computed in place (the ids set to -inf first).
                z.scatter_(1, chunk_ids, float("-inf"))
                peak = z.amax(1, keepdim=True)
                peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # k = V: an empty tail
                tail_sum = z.sub_(peak).exp_().sum(1, keepdim=True)
                tail_lse = peak + tail_sum.log()
                log_norm = torch.logaddexp(torch.logsumexp(picked, 1, keepdim=True), tail_lse)
                raw = torch.cat([picked, tail_lse], 1) - log_norm
                clamped = raw.clamp_min(LOG_ZERO)
                s = torch.log_softmax(clamped, 1)
                t = teacher_buckets(logp[rows], log_tail[rows])
                value, grad_s = row.value_and_grad(
                    s, t, torch.empty_like(s), torch.empty_like(s) if mixture else None, spec.beta, spec.skew
                )
                total += value.sum()
                # Back through clamp_min and the normalisation s = b - logsumexp(b) to the bucket logits b.
                grad_raw = grad_s * (raw >= LOG_ZERO)
                grad_b = grad_raw - raw.exp() * grad_raw.sum(1, keepdim=True)
                grad_b.mul_(temperature)  # d(T^2 L)/d(logits) = T^2 * (1/T) * dL/dz
                grad_z = z.div_(tail_sum.clamp_min(torch.finfo(torch.float32).tiny)).mul_(grad_b[:, -1:])
                grad_z.scatter_add_(1, chunk_ids, grad_b[:, :-1])
                grad_z = chain_head(grad_z, head, slope)  # back through the head's soft-cap and scale
                losses.backprop_chunk(grad_z, h, cropped, grads[0], grads[1], start, grads[2])
        losses.hold_gradients(ctx, grads, inputs)
        return total * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*losses.release_gradients(ctx, grad_output), *(None,) * 6)


def chunked_topk_divergence(
    student_hidden: Tensor,
    student_head: Tensor | OutputHead,
    targets: TopKTargets,
    kind: str | DivergenceSpec,
    *,
    vocab_size: int | None = None,
    **options: float,
) -> Tensor:
    """SUM over tokens of :func:`topk_per_token`, from hidden states ``[N, H]`` and the student's
    :class:`~distill.losses.head.OutputHead` (or a bare lm_head weight ``[V, H]``).

    Only one fp32 ``[chunk_size, V]`` tile exists at a time, and the gradient is computed in the same pass
    (:class:`_ChunkedTopK`). ``vocab_size`` crops the head's padding rows, as the online kernel does.
    Differentiable w.r.t. ``student_hidden`` and ``student_head``.
    """
    if student_hidden.shape[0] != targets.ids.shape[0]:
        raise ValueError(
            f"targets: {targets.ids.shape[0]} stored tokens for {student_hidden.shape[0]} counted positions "
            "(the store was built from differently tokenized data)"
        )
    spec = as_spec(kind, options)
    head = as_head(student_head)
    return _ChunkedTopK.apply(
        student_hidden,
        head.weight,
        head.bias,
        head,
        targets.ids,
        targets.logp,
        targets.log_tail,
        spec,
        vocab_size or head.weight.shape[0],
    )
