"""Divergences against precomputed top-k teacher targets (offline distillation), with a tail bucket.

The store keeps, per token, the teacher's k most likely ids with their log-probabilities and the log of the mass
left outside them (the *tail*). Both distributions are collapsed onto the same k + 1 buckets -- the k ids, and
"everything else" -- and every kind of :mod:`distill.losses.divergences` is computed between the two bucketed distributions:

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
    student_logits: Tensor,
    targets: TopKTargets,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """Per-token bucketed divergence ``[N]`` (times ``T**2``) of student logits ``[N, V]`` against the targets."""
    s = student_buckets(student_logits, targets.ids, temperature)
    t = teacher_buckets(targets.logp, targets.log_tail)
    # Bucket log-probabilities are valid logits (log_softmax leaves them unchanged); the temperature is applied.
    return losses.per_token_divergence(s, t, kind, temperature=1.0, beta=beta, skew=skew) * temperature**2


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
        head: Tensor,
        ids: Tensor,
        logp: Tensor,
        log_tail: Tensor,
        kind: str,
        temperature: float,
        beta: float,
        skew: float,
        chunk_size: int,
        vocab: int,
    ) -> Tensor:
        grad_hidden, grad_head = losses.gradient_accumulators(ctx, hidden, head)
        dtypes = (hidden.dtype, head.dtype)
        # Cropped inside the Function, so autograd gets the full-size gradient without a copy.
        cropped = losses.matmul_head(head[:vocab])
        n_tokens = hidden.shape[0]
        tile = torch.empty((min(chunk_size, n_tokens), vocab), dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        mixture = losses.needs_mixture_scratch(kind, beta)
        with torch.no_grad():
            for start in range(0, n_tokens, chunk_size):
                rows = slice(start, start + chunk_size)
                h, chunk_ids = hidden[rows], ids[rows]
                z = losses.project_into(tile[: h.shape[0]], h, cropped, 1.0 / temperature)
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
                value, grad_s = losses.divergence_and_grad(
                    s, t, torch.empty_like(s), torch.empty_like(s) if mixture else None, kind, beta, skew
                )
                total += value.sum()
                # Back through clamp_min and the normalisation s = b - logsumexp(b) to the bucket logits b.
                grad_raw = grad_s * (raw >= LOG_ZERO)
                grad_b = grad_raw - raw.exp() * grad_raw.sum(1, keepdim=True)
                grad_b.mul_(temperature)  # d(T^2 L)/d(logits) = T^2 * (1/T) * dL/dz
                grad_z = z.div_(tail_sum.clamp_min(torch.finfo(torch.float32).tiny)).mul_(grad_b[:, -1:])
                grad_z.scatter_add_(1, chunk_ids, grad_b[:, :-1])
                losses.backprop_chunk(grad_z, h, cropped, grad_hidden, grad_head, start)
        losses.hold_gradients(ctx, (grad_hidden, grad_head), dtypes)
        return total * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*losses.release_gradients(ctx, grad_output), *(None,) * 9)


def chunked_topk_divergence(
    student_hidden: Tensor,
    student_head: Tensor,
    targets: TopKTargets,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """SUM over tokens of :func:`topk_per_token`, from hidden states ``[N, H]`` and the lm_head weight ``[V, H]``.

    Only one fp32 ``[chunk_size, V]`` tile exists at a time, and the gradient is computed in the same pass
    (:class:`_ChunkedTopK`). ``vocab_size`` crops the head's padding rows, as the online kernel does.
    Differentiable w.r.t. ``student_hidden`` and ``student_head``.
    """
    if student_hidden.shape[0] != targets.ids.shape[0]:
        raise ValueError(
            f"targets: {targets.ids.shape[0]} stored tokens for {student_hidden.shape[0]} counted positions "
            "(the store was built from differently tokenized data)"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    return _ChunkedTopK.apply(
        student_hidden, student_head, targets.ids, targets.logp, targets.log_tail, kind, float(temperature),
        float(beta), float(skew), chunk_size, vocab_size or student_head.shape[0],
    )
