"""Hidden-state losses between one mapped (student, teacher) layer pair, plus Gram and FSP matrices.

Every function takes student states already projected to the teacher's width (see ``FeatureDistiller``), teacher
states, and the ``(batch, seq)`` bool mask; all return a scalar averaged over real tokens only. Inputs are cast to
float32 by the caller, so bf16 models do not lose the small differences these losses are made of.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.losses.features.masking import masked_mean

_EPS = 1e-8


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per feature, averaged over real tokens (TinyBERT / PKD hidden loss)."""
    per_token = (student - teacher).pow(2).mean(-1)
    return masked_mean(per_token, mask)


def hidden_cosine(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``1 - cos(student, teacher)`` per token, averaged over real tokens (DistilBERT's cosine loss)."""
    per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=_EPS)
    return masked_mean(per_token, mask)


def hidden_nmse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``||s - t||^2 / ||t||^2`` per token, averaged over real tokens.

    Normalising per token (not per batch) keeps the few tokens with huge activations that decoders have (the
    "massive activations" of the first token) from drowning every other token's error.
    """
    per_token = (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(_EPS)
    return masked_mean(per_token, mask)


def token_gram(hidden: Tensor) -> Tensor:
    """``(batch, seq, seq)`` cosine similarities between the tokens of each sequence."""
    unit = F.normalize(hidden, dim=-1, eps=_EPS)
    return unit @ unit.transpose(1, 2)


def gram(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """MSE between token Gram matrices (token-token cosine similarity) over pairs of real tokens.

    The Gram matrix is width-free, so no projector is needed: it transfers how the teacher relates the tokens
    of a sequence to each other, not the coordinates it uses.
    """
    pair_mask = mask.unsqueeze(2) & mask.unsqueeze(1)
    return masked_mean((token_gram(student) - token_gram(teacher)).pow(2), pair_mask)


def fsp_matrix(lower: Tensor, upper: Tensor, mask: Tensor) -> Tensor:
    """Flow of solution procedure between two layers: ``sum_t a_t^T b_t / n_real`` -> ``(batch, width, width)``.

    Token vectors are L2-normalised first, so a few massive activations do not dominate the matrix.
    """
    weights = mask.to(lower.dtype).unsqueeze(-1)
    a = F.normalize(lower, dim=-1, eps=_EPS) * weights
    b = F.normalize(upper, dim=-1, eps=_EPS) * weights
    return a.transpose(1, 2) @ b / weights.sum(1, keepdim=True).clamp_min(1)


def fsp(
    student_lower: Tensor, student_upper: Tensor, teacher_lower: Tensor, teacher_upper: Tensor, mask: Tensor
) -> Tensor:
    """Squared Frobenius distance between student and teacher FSP matrices, averaged over the batch (Yim 2017)."""
    diff = fsp_matrix(student_lower, student_upper, mask) - fsp_matrix(teacher_lower, teacher_upper, mask)
    return diff.pow(2).sum((1, 2)).mean()
