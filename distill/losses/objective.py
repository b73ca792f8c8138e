"""The distillation objective: which loss terms are computed from what, and how each is normalised.

``StudentWithObjective`` wraps the student (and any trainable loss parameters, such as feature projectors) in one
module whose ``forward`` returns the loss terms. Computing the losses inside ``forward`` is what lets DDP and
DeepSpeed see one module: DDP synchronises projector gradients with the student's, ZeRO-3 gathers the student's
lm_head weight for the chunked kernel (it is registered as an external parameter), and checkpoints hold projectors
beside the student without extra bookkeeping.

The terms, what each needs and which are token-level are in :mod:`distill.losses.registry`. Token-level terms
(cross-entropy, logit divergences) are computed as sums over counted tokens and multiplied by the step's
``token_scale`` (:func:`step_token_scale`), which divides by the counted tokens of the whole optimizer step (all
micro-batches, all ranks), so the gradient does not depend on how a batch is split. Feature and relation terms are
per-micro-batch means. The training step only weights and sums what ``forward`` returns.

The teacher's side arrives as :class:`TeacherTargets` (an online teacher's outputs, on the student's tokens or, across
tokenizers, on its own with the aligned pairs; or a top-k store's targets; see :mod:`distill.training.teacher`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from distill.data.datasets import IGNORE_INDEX
from distill.losses.divergences import chunked_cross_entropy_sum
from distill.losses.features.distiller import FeatureDistiller, FeatureSettings
from distill.losses.head import OutputHead, output_head
from distill.losses.kinds import CHUNK_SIZE, DivergenceSpec
from distill.losses.registry import CE, DIVERGENCES, FEATURE_TERMS, TERMS, Need, check_weights, needs
from kd_core.config import option, section


@dataclasses.dataclass
class LossSettings:
    terms: dict[str, float] = option(
        {"forward_kl": 0.5, "ce": 0.5},
        help="Loss terms and their weights. Logit divergences: " + ", ".join(DIVERGENCES) + "; `ce` = "
        "cross-entropy on labels (Hinton's alpha is {kind: alpha, ce: 1 - alpha}); feature/relation terms: "
        + ", ".join(FEATURE_TERMS)
        + ".",
    )
    terms_at_end: dict[str, float] | None = option(
        None,
        help="A weight schedule: the weights of loss.terms at the last optimizer step, reached linearly from "
        "loss.terms over the run (e.g. {forward_kl: 0.3, ce: 0.7} from {forward_kl: 0.7, ce: 0.3} moves weight from "
        "the teacher to the labels as training goes on); the same terms as loss.terms. null: constant weights.",
    )
    temperature: float = option(1.0, help="Softmax temperature for logit divergences; the result is scaled by T**2.")
    beta: float = option(0.5, help="Interpolation of the generalized JSD (0 = forward KL, 1 = reverse KL).")
    skew: float = option(0.1, help="Mixing weight of the skew KL divergences (DistiLLM).")
    chunk_size: int = option(
        CHUNK_SIZE,
        help="Tokens per chunk when computing logit losses from hidden states; working memory is about "
        "3 x chunk_size x vocab fp32 values (128 at a 152K vocabulary: 0.18x the naive peak and no slower than 256, "
        "see docs/benchmarks.md).",
    )
    teacher_store: str | None = option(
        None,
        help="Offline distillation: a store written by `distill precompute`; logit terms then use its top-k "
        "teacher log-probabilities (with a tail bucket) and no teacher is loaded (leave model.teacher unset).",
    )
    served_topk: int = option(
        20,
        help="With a served teacher (model.teacher_url): the k most likely next tokens the server returns at each "
        "position (its --max-logprobs must allow k); logit terms compare the k ids and the tail bucket, as with a "
        "store.",
    )
    cross_tokenizer: Literal["uld", "gold"] | None = option(
        None,
        help="Distil across tokenizers (the teacher reads the same text in its own tokens; the models are "
        "compared where both have read the same characters): `uld` = L1 between the sorted probability vectors "
        "(Boizard et al.), `gold` = the logit term's divergence on tokens whose text maps one to one between the "
        "vocabularies plus `uld` on the rest. null: the tokenizers must be the same (different ones are refused).",
    )
    features: FeatureSettings = section(FeatureSettings, help="Settings of feature- and relation-based terms.")

    def __post_init__(self) -> None:
        check_weights(self.terms)  # the one validation of loss.terms, against distill.losses.registry
        if not any(w > 0 for w in self.terms.values()):
            raise ValueError("terms: at least one loss term needs a positive weight")
        if self.terms_at_end is not None:
            self._check_schedule()
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta: expected a number in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew: expected a number in [0, 1), got {self.skew}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {self.chunk_size}")
        if self.served_topk < 1:
            raise ValueError(f"served_topk: expected >= 1, got {self.served_topk}")
        if self.teacher_store and self.feature_terms:
            raise ValueError(f"teacher_store: feature terms {sorted(self.feature_terms)} need an online teacher")
        if self.cross_tokenizer is not None:
            self._check_cross_tokenizer()

    def _check_schedule(self) -> None:
        """The schedule reweights the terms loss.terms computes: the same names, each >= 0, and none that starts at
        0 (a term with weight 0 is never computed, so it could not be switched on later)."""
        end = self.terms_at_end
        if not isinstance(end, dict) or set(end) != set(self.terms):
            raise ValueError(
                f"terms_at_end: expected a weight for each of loss.terms {sorted(self.terms)}, got "
                f"{sorted(end) if isinstance(end, dict) else end!r}"
            )
        for name, weight in end.items():
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or weight < 0
            ):
                raise ValueError(f"terms_at_end: {name}: expected a number >= 0, got {weight!r}")
            if weight > 0 and self.terms[name] <= 0:
                raise ValueError(f"terms_at_end: {name} has weight 0 in loss.terms, so it is never computed")

    def weights_at(self, step: int, total_steps: int) -> dict[str, float]:
        """The terms' weights at optimizer step ``step`` (0-based) of ``total_steps``: loss.terms, or with
        terms_at_end the linear path from loss.terms (first step) to terms_at_end (last step). A function of the
        step alone, so a resumed run weights every step as the uninterrupted run did."""
        if self.terms_at_end is None:
            return dict(self.terms)
        progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
        return {k: w + (self.terms_at_end[k] - w) * progress for k, w in self.terms.items()}

    def _check_cross_tokenizer(self) -> None:
        """One cross-tokenizer divergence: the term names the exact part of `gold` (with `uld` every kind would give
        the same value), and hidden states cannot be compared position by position."""
        if self.cross_tokenizer not in ("uld", "gold"):
            raise ValueError(f"cross_tokenizer: expected uld, gold or null, got {self.cross_tokenizer!r}")
        if len(self.logit_terms) != 1:
            raise ValueError(
                f"cross_tokenizer: expected exactly one logit divergence in loss.terms (the exact part "
                f"of gold; uld ignores its kind), got {sorted(self.logit_terms) or 'none'}"
            )
        if self.feature_terms:
            raise ValueError(
                f"cross_tokenizer: feature terms {sorted(self.feature_terms)} compare positions one to "
                "one and cannot be used across tokenizers"
            )

    def spec(self, kind: str) -> DivergenceSpec:
        """The divergence ``kind`` with this section's temperature, beta, skew and chunk size."""
        return DivergenceSpec(kind, self.temperature, self.beta, self.skew, self.chunk_size)

    @property
    def logit_terms(self) -> dict[str, float]:
        """The logit divergences with a positive weight."""
        return {k: w for k, w in self.terms.items() if TERMS[k].family == "divergence" and w > 0}

    @property
    def feature_terms(self) -> dict[str, float]:
        """The feature and relation terms with a positive weight."""
        return {k: w for k, w in self.terms.items() if TERMS[k].family == "feature" and w > 0}

    @property
    def needs(self) -> frozenset[Need]:
        """What the terms with a positive weight need together (zero-weight terms are never computed)."""
        return needs(k for k, w in self.terms.items() if w > 0)

    @property
    def needs_teacher(self) -> bool:
        """Whether a teacher model must run in the step (a store replaces it for the logit divergences only)."""
        return bool(self.feature_terms or (self.logit_terms and not self.teacher_store))


class TeacherTargets(Protocol):
    """The teacher's side of one micro-batch; the implementations (online, cross-tokenizer, store) are in
    :mod:`distill.training.teacher`."""

    @property
    def outputs(self) -> ModelOutput | None:
        """The teacher model's outputs (hidden states, attentions) for feature terms; None without a model."""

    def divergence(
        self,
        student_hidden: Tensor,
        student_head: OutputHead,
        positions: Tensor,
        spec: DivergenceSpec,
        vocab_size: int,
    ) -> Tensor:
        """SUM over the counted tokens of the divergence ``spec`` (times ``T**2``) of the student against the
        teacher: ``student_hidden [N, H]`` are the student's final hidden states at ``positions [B, T]``
        (:func:`target_positions`), ``student_head`` its output head; differentiable w.r.t. both."""


def target_positions(labels: Tensor) -> Tensor:
    """[B, T] bool: positions whose hidden state predicts a counted label (causal shift by one)."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def target_labels(labels: Tensor, positions: Tensor) -> Tensor:
    """[N] the label each counted position predicts (the next token), in the order of ``hidden[positions]``."""
    return labels[:, 1:][positions[:, :-1]]


def step_token_scale(
    micro_batch_labels: Sequence[Tensor], reduce_sum: Callable[[Tensor], Tensor], processes: int, accumulation: int
) -> float:
    """The ``token_scale`` of every micro-batch of one optimizer step: ``processes * accumulation`` over the counted
    tokens of the whole step (``reduce_sum`` sums a tensor over ranks). DDP/DeepSpeed average gradients over ranks
    and accelerate/DeepSpeed divide by the accumulation steps, which the numerator undoes, so each token-level sum
    becomes its share of the step's per-token mean."""
    local_tokens = sum(target_positions(labels).sum() for labels in micro_batch_labels).double()
    step_tokens = reduce_sum(local_tokens).item()
    return processes * accumulation / max(step_tokens, 1.0)


class StudentWithObjective(nn.Module):
    """The student plus trainable loss parameters; ``forward`` returns ``{term: value}`` (see module docstring)."""

    def __init__(
        self,
        student: PreTrainedModel,
        settings: LossSettings,
        vocab_size: int,
        teacher_config: PretrainedConfig | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.settings = settings
        self.vocab_size = vocab_size
        self.features = None
        if Need.STUDENT_LOGITS in settings.needs:
            output_head(student)  # refuses, up front, a family whose head the kernels cannot reproduce
        if settings.feature_terms:
            self.features = FeatureDistiller(settings.feature_terms, settings.features, student.config, teacher_config)

    @property
    def config(self) -> PretrainedConfig:
        """The student's config: accelerate 1.15 reads ``model.config.hidden_size`` to fill the DeepSpeed bucket
        sizes left as "auto" in launch/ds_zero3.json."""
        return self.student.config

    @property
    def is_gradient_checkpointing(self) -> bool:
        """The student's: trl 1.16's ``unwrap_model_for_generation`` (on-policy sampling) reads it (transformers 5.24
        renamed it ``is_activation_checkpointing`` and warns on the old name)."""
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            if hasattr(type(self.student), name) or hasattr(self.student, name):
                return bool(getattr(self.student, name))
        return False

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        teacher: TeacherTargets | None = None,
        loss_weights: Tensor | None = None,
        token_scale: float = 1.0,
        position_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``{term: value}``, token-level terms multiplied by ``token_scale`` (:func:`step_token_scale`; 1 = plain
        sums over counted tokens). ``teacher``: None when no term needs one (``ce`` only). ``loss_weights`` [B] (or
        [B, T] per token, for packed rows): weights of the ``ce`` term (distilling step-by-step, on-policy samples);
        None = all 1. ``position_ids``: a packed batch (:func:`distill.data.datasets.collate_packed`); the attention
        mask is then left to transformers' packed-sequence masks. Pass ``teacher`` and what follows by keyword:
        ZeRO-3's module hooks then leave them alone (they only see positional inputs)."""
        wanted = self.settings.needs
        student_out = self.student.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask if position_ids is None else None,
            position_ids=position_ids,
            output_hidden_states=Need.HIDDEN_STATES in wanted,
            output_attentions=Need.ATTENTIONS in wanted,
            use_cache=False,
        )
        terms: dict[str, Tensor] = {}
        if self.features is not None:
            if teacher is None or teacher.outputs is None:
                raise ValueError(f"feature terms {self.features.terms} need the outputs of a teacher model")
            terms.update(self.features(student_out, teacher.outputs, attention_mask))
        if Need.STUDENT_LOGITS in wanted:  # not for feature/relation terms only (encoders have no LM head)
            terms.update(self._logit_terms(student_out.last_hidden_state, labels, teacher, loss_weights))
        return {k: v * token_scale if TERMS[k].token_level else v for k, v in terms.items()}

    def _logit_terms(
        self, last_hidden: Tensor, labels: Tensor, teacher: TeacherTargets | None, loss_weights: Tensor | None
    ) -> dict[str, Tensor]:
        """Cross-entropy and logit divergences, as sums over the counted tokens."""
        s = self.settings
        terms: dict[str, Tensor] = {}
        positions = target_positions(labels)
        student_hidden = last_hidden[positions]
        student_head = output_head(self.student)  # read per step: the parameters themselves, as ZeRO-3 holds them
        if s.terms.get(CE, 0) > 0:
            targets = target_labels(labels, positions)
            token_weights = None
            if loss_weights is not None and bool((loss_weights != 1).any()):
                per_token = loss_weights if loss_weights.dim() == 2 else loss_weights[:, None].expand_as(labels)
                token_weights = per_token[positions].float()
            terms[CE] = chunked_cross_entropy_sum(student_hidden, student_head, targets, s.chunk_size, token_weights)
        if s.logit_terms:
            if teacher is None:
                raise ValueError(f"logit terms {sorted(s.logit_terms)} need a teacher (a model or a store)")
            for kind in s.logit_terms:
                terms[kind] = teacher.divergence(student_hidden, student_head, positions, s.spec(kind), self.vocab_size)
        return terms
