"""How each feature and relation term is computed from one micro-batch: one function per term, which the loss-term
registry (:mod:`distill.losses.registry`) carries in the term's row, so a term's name, needs and code sit together
(adding a term: its function here, its row there).

Every function takes a :class:`FeatureBatch` (both models' outputs, the mask and what
:class:`~distill.losses.features.FeatureDistiller` resolved from the config: mapped layer pairs, projectors, pooled
layers, MiniLM layers and heads) and returns the term's unweighted scalar loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from distill.losses.features import hidden, relations
from distill.losses.features.attention import attention_transfer
from distill.losses.features.mapping import EMBEDDINGS, hidden_index
from distill.losses.features.masking import pool
from distill.losses.features.minilm import minilm_v1, minilm_v2
from kd_core.config import ConfigError

Pair = tuple[int, int]


def projector_key(pair: Pair) -> str:
    """The name of a mapped pair's projector (student width -> teacher width) in the distiller's ModuleDict."""
    student, teacher = ("emb" if layer == EMBEDDINGS else str(layer) for layer in pair)
    return f"student{student}_teacher{teacher}"


class TermSettings(Protocol):
    """What the term functions read of the ``features`` section (:class:`~distill.losses.features.FeatureSettings`,
    which imports this module)."""

    pooling: str
    attention_loss: str
    head_map: list[int] | str


@dataclasses.dataclass
class FeatureBatch:
    """One micro-batch as the term functions read it; states are fp32 on the student's device (teachers may live
    elsewhere and run in bf16), and projected student states are computed once per pair."""

    student_out: ModelOutput
    teacher_out: ModelOutput
    mask: Tensor  # [B, T] bool, True = a real token
    settings: TermSettings
    pairs: list[Pair]
    projectors: nn.ModuleDict
    relation_layers: Pair
    minilm_layers: Pair
    relation_heads: int
    qkv: Callable[[], tuple[dict[str, Tensor], dict[str, Tensor]]]  # recorded (student, teacher) q/k/v outputs
    _projected: dict[Pair, Tensor] = dataclasses.field(default_factory=dict)

    def student(self, layer: int) -> Tensor:
        return self.student_out.hidden_states[hidden_index(layer)].to(device=self.mask.device, dtype=torch.float32)

    def teacher(self, layer: int) -> Tensor:
        return self.teacher_out.hidden_states[hidden_index(layer)].to(device=self.mask.device, dtype=torch.float32)

    def projected(self, pair: Pair) -> Tensor:
        """The student's states of a mapped pair, through its projector when the widths differ."""
        if pair not in self._projected:
            states, key = self.student(pair[0]), projector_key(pair)
            self._projected[pair] = self.projectors[key](states) if key in self.projectors else states
        return self._projected[pair]

    def attentions(self, student_layer: int, teacher_layer: int) -> tuple[Tensor, Tensor]:
        device = self.mask.device
        return self.student_out.attentions[student_layer], self.teacher_out.attentions[teacher_layer].to(device)

    def pooled(self) -> tuple[Tensor, Tensor]:
        """Sentence vectors of both models at the relation layers."""
        (s_layer, t_layer), how = self.relation_layers, self.settings.pooling
        return pool(self.student(s_layer), self.mask, how), pool(self.teacher(t_layer), self.mask, how)


def mean_over(values) -> Tensor:
    items = list(values)
    if not items:  # e.g. attention_transfer with only the embedding pair mapped
        raise ConfigError("feature losses: no mapped transformer layer pair for this term")
    return torch.stack(items).mean()


def per_pair(loss: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[FeatureBatch], Tensor]:
    """A hidden-state term: ``loss(projected student, teacher, mask)`` averaged over the mapped pairs."""
    return lambda b: mean_over(loss(b.projected(p), b.teacher(p[1]), b.mask) for p in b.pairs)


def gram(b: FeatureBatch) -> Tensor:
    # Token-by-token similarities do not depend on the width: no projector.
    return mean_over(hidden.gram(b.student(p[0]), b.teacher(p[1]), b.mask) for p in b.pairs)


def fsp(b: FeatureBatch) -> Tensor:
    return mean_over(
        hidden.fsp(b.projected(lo), b.projected(hi), b.teacher(lo[1]), b.teacher(hi[1]), b.mask)
        for lo, hi in zip(b.pairs, b.pairs[1:])
    )


def attention(b: FeatureBatch) -> Tensor:
    s = b.settings
    return mean_over(
        attention_transfer(*b.attentions(ls, lt), b.mask, s.attention_loss, s.head_map)
        for ls, lt in b.pairs
        if ls != EMBEDDINGS
    )


def relation(loss: Callable[[Tensor, Tensor], Tensor]) -> Callable[[FeatureBatch], Tensor]:
    """A relation term: ``loss`` between the pooled sentence vectors of both models."""
    return lambda b: loss(*b.pooled())


def minilm_relations(b: FeatureBatch) -> Tensor:
    student, teacher = b.qkv()
    return minilm_v2(student, teacher, b.mask, b.relation_heads)


def minilm_attention_values(b: FeatureBatch) -> Tensor:
    student, teacher = b.qkv()
    return minilm_v1(
        *b.attentions(*b.minilm_layers), student["v"], teacher["v"], b.mask, b.relation_heads, b.settings.head_map
    )


hidden_mse = per_pair(hidden.hidden_mse)
hidden_cosine = per_pair(hidden.hidden_cosine)
hidden_nmse = per_pair(hidden.hidden_nmse)
rkd_distance = relation(relations.rkd_distance)
rkd_angle = relation(relations.rkd_angle)
similarity_preserving = relation(relations.similarity_preserving)
