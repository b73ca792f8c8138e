"""``FeatureDistiller``: the feature- and relation-based loss terms of a distillation run, as one module.

The trainer builds it from the loss weights and the ``features`` config section, calls :meth:`attach` once the
models exist, runs both models with ``output_hidden_states`` / ``output_attentions`` as :attr:`needs_hidden_states`
and :attr:`needs_attentions` say, and calls :meth:`forward` for ``{term: unweighted loss}``. The module owns the
learned projectors (student width -> teacher width): they train with the student and are saved in checkpoints, but
they are not part of the exported student.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.utils import ModelOutput

from distill.losses.features.attention import check_attention_implementation
from distill.losses.features.mapping import layer_pairs, resolve_layer
from distill.losses.features.masking import as_bool_mask
from distill.losses.features.minilm import QKVCapture
from distill.losses.features.terms import FeatureBatch, projector_key
from distill.losses.registry import FEATURE_TERMS, QKV, TERMS, Need, check_weights, needs
from kd_core.config import ConfigError, option

# Terms that compare mapped layer pairs; of them, those comparing coordinates need projectors between widths.
PROJECTED_TERMS = ("hidden_mse", "hidden_cosine", "hidden_nmse", "fsp")
LAYER_MAP_TERMS = ("hidden_mse", "hidden_cosine", "hidden_nmse", "attention_transfer", "gram", "fsp")


@dataclasses.dataclass
class FeatureSettings:
    """How feature and relation terms pick layers, pool sentences and match heads (config section)."""

    layer_map: Literal["uniform", "last_k", "explicit"] = option(
        "uniform",
        help="Student->teacher layer mapping for hidden/attention/gram/fsp terms: uniform (PKD-Skip: "
        "student layer i <- teacher layer (i+1)*T//S-1), last_k (PKD-Last) or explicit (see `layers`).",
    )
    layers: list[list[int]] = option(
        [], help="With layer_map: explicit, [[student_layer, teacher_layer], ...]; 0-based, -1 = last layer."
    )
    last_k: int = option(0, help="With layer_map: last_k, how many final layers to map (0 = all student layers).")
    include_embeddings: bool = option(False, help="Also match the embedding outputs (hidden_states[0]).")
    pooling: Literal["mean", "cls", "last"] = option(
        "mean",
        help="Sentence vector for relation terms (rkd_*, similarity_preserving): mean over real tokens "
        "(default, decoders and sentence encoders), cls (first token, BERT-style) or last (last real token).",
    )
    relation_student_layer: int = option(-1, help="Student layer pooled for relation terms (-1 = last).")
    relation_teacher_layer: int = option(-1, help="Teacher layer pooled for relation terms (-1 = last).")
    attention_loss: Literal["mse", "kl"] = option(
        "kl", help="attention_transfer divergence between attention probabilities: kl (teacher || student) or mse."
    )
    head_map: list[int] | str = option(
        "average",
        help="How heads are matched when counts differ: 'average' (average all heads on each side) or "
        "a list giving, for each student head, the teacher head it learns from.",
    )
    minilm_student_layer: int = option(-1, help="Student layer whose self-attention relations MiniLM terms train.")
    minilm_teacher_layer: int = option(
        -1,
        help="Teacher layer MiniLM terms learn from (-1 = last; MiniLMv2 suggests an upper-middle layer "
        "for large teachers).",
    )
    relation_heads: int = option(
        0, help="MiniLM relation heads (q/k/v widths of both models must divide by it); 0 = teacher's head count."
    )

    def __post_init__(self) -> None:
        if isinstance(self.head_map, str) and self.head_map != "average":
            raise ValueError(f"head_map: expected 'average' or a list of teacher head indices, got {self.head_map!r}")
        if self.relation_heads < 0:
            raise ValueError(
                f"relation_heads: expected 0 (teacher heads) or a positive number, got {self.relation_heads}"
            )
        if self.last_k < 0:
            raise ValueError(f"last_k: expected 0 (all student layers) or a positive number, got {self.last_k}")


class FeatureDistiller(nn.Module):
    """Computes the configured feature/relation terms from student and teacher model outputs."""

    def __init__(
        self,
        weights: dict[str, float],
        settings: FeatureSettings,
        student_config: PretrainedConfig,
        teacher_config: PretrainedConfig,
    ) -> None:
        """Validates terms, layers and heads against both configs (ConfigError) and builds the projectors."""
        super().__init__()
        check_weights(weights, family="feature", error=ConfigError)
        # Zero-weight terms are skipped entirely: they would cost a forward pass of their own and add nothing.
        self.terms = [term for term in FEATURE_TERMS if weights.get(term, 0.0) > 0]
        self.needs = needs(self.terms)
        self.attention_terms = [term for term in self.terms if Need.ATTENTIONS in TERMS[term].needs]
        self.settings = settings
        s_layers, t_layers = student_config.num_hidden_layers, teacher_config.num_hidden_layers
        s_heads, t_heads = student_config.num_attention_heads, teacher_config.num_attention_heads

        self.pairs: list[tuple[int, int]] = []
        if any(term in LAYER_MAP_TERMS for term in self.terms):
            self.pairs = layer_pairs(
                settings.layer_map,
                s_layers,
                t_layers,
                layers=settings.layers,
                last_k=settings.last_k,
                include_embeddings=settings.include_embeddings,
            )
        self._check_pairs_and_heads(s_heads, t_heads)
        self.relation_layers = (
            resolve_layer(settings.relation_student_layer, s_layers, "relation_student_layer"),
            resolve_layer(settings.relation_teacher_layer, t_layers, "relation_teacher_layer"),
        )
        self.minilm_layers = (
            resolve_layer(settings.minilm_student_layer, s_layers, "minilm_student_layer"),
            resolve_layer(settings.minilm_teacher_layer, t_layers, "minilm_teacher_layer"),
        )
        self.relation_heads = settings.relation_heads or t_heads

        self.needs_attentions = Need.ATTENTIONS in self.needs
        self.needs_hidden_states = Need.HIDDEN_STATES in self.needs
        if self.needs_attentions:
            check_attention_implementation(student_config, "student", self.attention_terms)
            check_attention_implementation(teacher_config, "teacher", self.attention_terms)

        # One projector per mapped pair: layers of one model differ in scale and role, so a shared map would
        # have to compromise between them. Only hidden and FSP terms compare coordinates and need them.
        self.projectors = nn.ModuleDict()
        if student_config.hidden_size != teacher_config.hidden_size and any(t in PROJECTED_TERMS for t in self.terms):
            for pair in self.pairs:
                self.projectors[projector_key(pair)] = nn.Linear(student_config.hidden_size, teacher_config.hidden_size)
        self._student_qkv = QKVCapture()
        self._teacher_qkv = QKVCapture()

    def _check_pairs_and_heads(self, s_heads: int, t_heads: int) -> None:
        """FSP relates consecutive mapped layers, so it needs two pairs; a head map names one teacher head per
        student head."""
        if "fsp" in self.terms and len(self.pairs) < 2:
            raise ConfigError("fsp: needs at least two mapped layer pairs (FSP relates consecutive mapped layers)")
        head_map = self.settings.head_map
        if not (isinstance(head_map, list) and self.attention_terms):
            return
        if len(head_map) != s_heads or not all(0 <= h < t_heads for h in head_map):
            raise ConfigError(
                f"head_map: expected {s_heads} teacher head indices in 0..{t_heads - 1} (one per student head), "
                f"got {head_map}"
            )

    # ----------------------------------------------------------------------------------------------------------

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Checks attention implementations and hooks the q/k/v projections MiniLM terms read (peft models too)."""
        if self.needs_attentions:
            check_attention_implementation(student.config, "student", self.attention_terms)
            check_attention_implementation(teacher.config, "teacher", self.attention_terms)
        self.detach()
        wanted = tuple(sorted(need.value for need in QKV if need in self.needs))
        if not wanted:
            return
        for capture, model, layer, who in (
            (self._student_qkv, student, self.minilm_layers[0], "student"),
            (self._teacher_qkv, teacher, self.minilm_layers[1], "teacher"),
        ):
            for kind, width in capture.attach(model, layer, wanted).items():
                if width % self.relation_heads:
                    raise ConfigError(
                        f"relation_heads: {self.relation_heads} does not divide the {who}'s {kind} width {width} "
                        f"at layer {layer}; choose a common divisor of both models' q/k/v widths"
                    )

    def detach(self) -> None:
        """Removes the hooks installed by :meth:`attach`."""
        self._student_qkv.remove()
        self._teacher_qkv.remove()

    def check_batch_size(self, n: int) -> None:
        """Raises ConfigError when a relation term cannot be computed on batches of ``n`` samples."""
        for term in self.terms:
            if n < TERMS[term].min_batch:
                raise ConfigError(
                    f"{term}: relates the samples of a batch to each other and needs at least {TERMS[term].min_batch} "
                    f"samples per batch (per device), got {n}; raise the per-device batch size or drop the term"
                )

    def extra_repr(self) -> str:
        return f"terms={self.terms}, pairs={self.pairs}"

    # ----------------------------------------------------------------------------------------------------------

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, attention_mask: Tensor) -> dict[str, Tensor]:
        """``{term: unweighted scalar loss}`` for every term with a positive weight; padding never counts. Each term
        is computed by the function its registry row carries (:mod:`distill.losses.features.terms`)."""
        self.check_batch_size(attention_mask.shape[0])
        if self.needs_hidden_states and not (student_out.hidden_states and teacher_out.hidden_states):
            raise ValueError("feature losses: run both models with output_hidden_states=True")
        if self.needs_attentions and not (student_out.attentions and teacher_out.attentions):
            raise ConfigError(
                "attention losses: the models returned no attentions; use attn_implementation: eager "
                "and output_attentions=True"
            )
        # The trainer passes the mask on the student's device; teacher tensors are moved there (it may live elsewhere).
        device = attention_mask.device
        batch = FeatureBatch(
            student_out,
            teacher_out,
            as_bool_mask(attention_mask),
            self.settings,
            self.pairs,
            self.projectors,
            self.relation_layers,
            self.minilm_layers,
            self.relation_heads,
            qkv=lambda: (self._captured(self._student_qkv, device), self._captured(self._teacher_qkv, device)),
        )
        losses = {term: TERMS[term].compute(batch) for term in self.terms}
        # Drop the recorded q/k/v: they hold the student's graph, and a later forward must never reuse stale ones.
        self._student_qkv.outputs.clear()
        self._teacher_qkv.outputs.clear()
        return losses

    @staticmethod
    def _captured(capture: QKVCapture, device: torch.device) -> dict[str, Tensor]:
        if not capture.outputs:
            raise RuntimeError(
                "MiniLM losses: no q/k/v recorded; call FeatureDistiller.attach(student, teacher) "
                "once and run both models before each FeatureDistiller forward"
            )
        return {kind: out.to(device) for kind, out in capture.outputs.items()}
