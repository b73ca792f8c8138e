"""Mask and pooling helpers shared by the feature losses: padding tokens never count.

``mask`` is always the ``(batch, seq)`` attention mask of the batch (1 = real token), turned into a bool tensor
by :func:`as_bool_mask`. Reductions use ``torch.where`` rather than multiplying by the mask, so a NaN or inf
computed at a padded position (a zero-norm vector, an all-masked softmax row) can never leak into a loss or its
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """At least float32: bf16/fp16 would lose the small differences these losses are made of (float64 stays)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_bool_mask(attention_mask: Tensor) -> Tensor:
    """The ``(batch, seq)`` mask as bool, whatever dtype the collator produced."""
    return attention_mask.to(torch.bool)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (shapes broadcast)."""
    mask = mask.expand_as(values)
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp_min(1)


def masked_log_softmax(scores: Tensor, key_mask: Tensor) -> Tensor:
    """``log_softmax`` over the last dim with padded keys excluded.

    Padded keys get the most negative finite value rather than ``-inf``: ``-inf - -inf`` would make NaNs that
    ``torch.where`` hides in the forward pass but not in the gradient.
    """
    filled = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    return torch.log_softmax(filled, dim=-1)


def kl_rows(teacher_log_probs: Tensor, student_log_probs: Tensor, key_mask: Tensor) -> Tensor:
    """KL(teacher || student) of each row (sum over the last dim, padded keys skipped); includes teacher entropy."""
    terms = teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)
    return torch.where(key_mask, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(-1)


def pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """Sentence vectors ``(batch, width)`` from ``(batch, seq, width)`` token states.

    ``mean``: average over real tokens (sentence-transformers' pooling; the default for decoders too).
    ``cls``: the first position (BERT-style encoders, which pad on the right).
    ``last``: the last real token, found from the mask so left and right padding both work.
    """
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        seq = mask.shape[1]
        # Index of the last true value: flip, take the first true, map back.
        last = seq - 1 - torch.flip(mask.to(torch.int64), dims=[1]).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling: expected 'mean', 'cls' or 'last', got {how!r}")
