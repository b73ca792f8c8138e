"""Relation-based losses over pooled sample representations of a batch (RKD, similarity-preserving).

They compare how the student and the teacher arrange the samples of a batch relative to each other, so the two
models may have different widths and no projector is needed. They need at least two samples (three for angles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances ``(batch, batch)``; the clamp keeps the sqrt's gradient finite on the diagonal."""
    squared = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.where(eye, torch.zeros((), dtype=x.dtype, device=x.device), squared.clamp_min(_EPS).sqrt())


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss (Park et al. 2019): Huber loss between distance matrices, each divided by its mean.

    Averaged over the ``B(B-1)`` off-diagonal pairs (the diagonal is zero on both sides and would only dilute it).
    """
    off = ~torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
    d_s = pairwise_distances(student)
    d_t = pairwise_distances(teacher)
    d_s = d_s / d_s[off].mean().clamp_min(_EPS)
    d_t = d_t / d_t[off].mean().clamp_min(_EPS)
    return F.smooth_l1_loss(d_s[off], d_t[off])


def triplet_angles(x: Tensor) -> Tensor:
    """``angles[j, i, k] = cos`` of the angle at sample j between samples i and k, shape ``(batch,)*3``."""
    directions = F.normalize(x.unsqueeze(1) - x.unsqueeze(0), dim=-1, eps=_EPS)  # [j, i] = unit(x_i - x_j)
    return directions @ directions.transpose(1, 2)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss (Park et al. 2019): Huber loss between triplet angle cosines, over triplets of 3 distinct
    samples."""
    n = student.shape[0]
    idx = torch.arange(n, device=student.device)
    j, i, k = idx.view(n, 1, 1), idx.view(1, n, 1), idx.view(1, 1, n)
    distinct = (i != j) & (k != j) & (i != k)
    return F.smooth_l1_loss(triplet_angles(student)[distinct], triplet_angles(teacher)[distinct])


def similarity_preserving(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): ``||norm(G_s) - norm(G_t)||_F^2 / B^2`` with ``G = X X^T``
    row-L2-normalised."""
    g_s = F.normalize(student @ student.T, dim=1)
    g_t = F.normalize(teacher @ teacher.T, dim=1)
    return (g_s - g_t).pow(2).sum() / student.shape[0] ** 2
