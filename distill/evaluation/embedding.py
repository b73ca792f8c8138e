"""Held-out figures for encoder students (no LM head): how close their sentence embeddings are to the teacher's.

``embedding_cosine`` is the mean cosine between student and teacher embeddings of the same sentence;
``retrieval_agreement`` the fraction of sentences whose nearest other sentence is the same for both models (top-1
retrieval among the eval set). Embeddings are pooled over real tokens (``loss.features.pooling``) and L2-normalised,
as sentence-transformers does for all-MiniLM-L6-v2.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.features.masking import pool


def embedding_agreement(student: Tensor, teacher: Tensor) -> tuple[float, float]:
    """(mean student-teacher cosine, top-1 retrieval agreement) for unit-norm embeddings of the same sentences."""
    cosine = (student * teacher).sum(-1).mean().item()
    eye = torch.eye(len(student), dtype=torch.bool, device=student.device)
    nearest_s = (student @ student.T).masked_fill(eye, -2.0).argmax(1)
    nearest_t = (teacher @ teacher.T).masked_fill(eye, -2.0).argmax(1)
    return cosine, (nearest_s == nearest_t).float().mean().item()


@torch.no_grad()
def embedding_metrics(
    student: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, Tensor]], pooling: str
) -> dict[str, float]:
    """Every process embeds the whole eval set (eval sets are small), so no gathering is needed and ZeRO-3 ranks
    run the same forwards."""
    student_embeddings, teacher_embeddings = [], []
    for batch in batches:
        mask = batch["attention_mask"].bool()
        for model, out in ((student, student_embeddings), (teacher, teacher_embeddings)):
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            out.append(F.normalize(pool(hidden.float(), mask, pooling), dim=-1))
    cosine, agreement = embedding_agreement(torch.cat(student_embeddings), torch.cat(teacher_embeddings))
    return {"embedding_cosine": cosine, "retrieval_agreement": agreement}
