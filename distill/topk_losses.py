"""Divergences against precomputed top-k teacher targets (offline distillation), with a tail bucket.

The store keeps, per token, the teacher's k most likely ids with their log-probabilities and the log of the mass
left outside them (the *tail*). Both distributions are collapsed onto the same k + 1 buckets -- the k ids, and
"everything else" -- and every kind of :mod:`distill.losses` is computed between the two bucketed distributions:

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

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill import losses
from distill.logit_store import TopKTargets

# log(0) stand-in: losses.per_token_divergence expects finite logits, and exp(-1e4) is exactly 0 in fp32, so an
# empty bucket (the tail when k = V) contributes exactly 0 instead of 0 * inf = NaN.
LOG_ZERO = -1.0e4


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

    Each chunk's ``[chunk_size, V]`` logits are recomputed in backward (activation checkpointing) instead of stored.
    ``vocab_size`` crops the head's padding rows, as the online kernel does.
    """
    if student_hidden.shape[0] != targets.ids.shape[0]:
        raise ValueError(
            f"targets: {targets.ids.shape[0]} stored tokens for {student_hidden.shape[0]} counted positions "
            "(the store was built from differently tokenized data)"
        )
    head = student_head[: vocab_size or student_head.shape[0]]

    def chunk(h: Tensor, w: Tensor, ids: Tensor, logp: Tensor, log_tail: Tensor) -> Tensor:
        part = TopKTargets(ids, logp, log_tail)
        return topk_per_token(h @ w.t(), part, kind, temperature=temperature, beta=beta, skew=skew).sum()

    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(
            chunk, student_hidden[rows], head, targets.ids[rows], targets.logp[rows], targets.log_tail[rows],
            use_reentrant=False,
        )
    return total
