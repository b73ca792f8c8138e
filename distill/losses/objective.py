"""The distillation objective: which loss terms are computed from what, in one place.

``StudentWithObjective`` wraps the student (and any trainable loss parameters, such as feature projectors) in one
module whose ``forward`` returns the loss terms. Computing the losses inside ``forward`` is what lets DDP and
DeepSpeed see one module: DDP synchronises projector gradients with the student's, ZeRO-3 gathers the student's
lm_head weight for the chunked kernel (it is registered as an external parameter), and checkpoints hold projectors
beside the student without extra bookkeeping.

Token-level terms (logit divergences, cross-entropy) are returned as *sums* over counted tokens; the trainer divides
by the number of counted tokens in the whole optimizer step (all micro-batches, all ranks), so the gradient does not
depend on how a batch is split. Feature and relation terms are per-micro-batch means.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from distill.losses import divergences as losses
from kd_core.config import option, section
from distill.data.datasets import IGNORE_INDEX
from distill.losses.features.distiller import FEATURE_TERMS, FeatureDistiller, FeatureSettings
from distill.offline.store import TopKTargets
from distill.losses.topk import chunked_topk_divergence

CE_TERM = "ce"


@dataclasses.dataclass
class LossSettings:
    terms: dict[str, float] = option(
        {"forward_kl": 0.5, "ce": 0.5},
        help="Loss terms and their weights. Logit divergences: forward_kl, reverse_kl, jsd, skew_forward_kl, "
        "skew_reverse_kl, tvd; `ce` = cross-entropy on labels (Hinton's alpha is {kind: alpha, ce: 1 - alpha}); "
        "feature/relation terms: " + ", ".join(FEATURE_TERMS) + ".",
    )
    temperature: float = option(1.0, help="Softmax temperature for logit divergences; the result is scaled by T**2.")
    beta: float = option(0.5, help="Interpolation of the generalized JSD (0 = forward KL, 1 = reverse KL).")
    skew: float = option(0.1, help="Mixing weight of the skew KL divergences (DistiLLM).")
    chunk_size: int = option(
        256, help="Tokens per chunk when computing logit losses from hidden states; working memory is about "
        "3 x chunk_size x vocab fp32 values (256 at a 152K vocabulary: 0.24x the naive peak, see docs/benchmarks.md)."
    )
    teacher_store: str | None = option(
        None, help="Offline distillation: a store written by `distill precompute`; logit terms then use its top-k "
        "teacher log-probabilities (with a tail bucket) and no teacher is loaded (leave model.teacher unset)."
    )
    features: FeatureSettings = section(FeatureSettings, help="Settings of feature- and relation-based terms.")

    def __post_init__(self) -> None:
        known = set(losses.KINDS) | {CE_TERM} | set(FEATURE_TERMS)
        for name, weight in self.terms.items():
            if name not in known:
                import difflib

                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(known))})"
                raise ValueError(f"terms.{name}: unknown loss term{hint}")
            if weight < 0:
                raise ValueError(f"terms.{name}: weight must be >= 0, got {weight}")
        if not any(w > 0 for w in self.terms.values()):
            raise ValueError("terms: at least one loss term needs a positive weight")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta: expected a number in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew: expected a number in [0, 1), got {self.skew}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {self.chunk_size}")
        if self.teacher_store and self.feature_terms:
            raise ValueError(f"teacher_store: feature terms {sorted(self.feature_terms)} need an online teacher")

    @property
    def logit_terms(self) -> dict[str, float]:
        return {k: w for k, w in self.terms.items() if k in losses.KINDS and w > 0}

    @property
    def feature_terms(self) -> dict[str, float]:
        return {k: w for k, w in self.terms.items() if k in FEATURE_TERMS and w > 0}

    @property
    def needs_teacher(self) -> bool:
        return bool(self.feature_terms or (self.logit_terms and not self.teacher_store))


def target_positions(labels: Tensor) -> Tensor:
    """[B, T] bool: positions whose hidden state predicts a counted label (causal shift by one)."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


class StudentWithObjective(nn.Module):
    """The student plus trainable loss parameters; ``forward`` returns ``{term: value}`` (see module docstring)."""

    def __init__(
        self,
        student: nn.Module,
        settings: LossSettings,
        vocab_size: int,
        teacher_config=None,
    ) -> None:
        super().__init__()
        self.student = student
        self.settings = settings
        self.vocab_size = vocab_size
        self.features = None
        if settings.feature_terms:
            self.features = FeatureDistiller(settings.feature_terms, settings.features, student.config, teacher_config)

    @property
    def config(self):
        """The student's config: accelerate 1.15 reads ``model.config.hidden_size`` to fill the DeepSpeed bucket
        sizes left as "auto" in launch/ds_zero3.json."""
        return self.student.config

    @property
    def needs_hidden_states(self) -> bool:
        return self.features is not None and self.features.needs_hidden_states

    @property
    def needs_attentions(self) -> bool:
        return self.features is not None and self.features.needs_attentions

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        teacher_outputs=None,
        teacher_head: Tensor | None = None,
        loss_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``loss_weights`` [B]: per-example weights of the ``ce`` term (distilling step-by-step); None = all 1."""
        s = self.settings
        student_out = self.student.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=self.needs_hidden_states,
            output_attentions=self.needs_attentions,
            use_cache=False,
        )
        terms: dict[str, Tensor] = {}
        if self.features is not None:
            terms.update(self.features(student_out, teacher_outputs, attention_mask))
        if not (s.terms.get(CE_TERM, 0) > 0 or s.logit_terms):
            return terms  # feature/relation terms only (encoders have no LM head)
        positions = target_positions(labels)
        student_hidden = student_out.last_hidden_state[positions]
        student_head = self.student.get_output_embeddings().weight
        if s.terms.get(CE_TERM, 0) > 0:
            targets = labels[:, 1:][positions[:, :-1]]
            token_weights = None
            if loss_weights is not None and bool((loss_weights != 1).any()):
                token_weights = loss_weights[:, None].expand_as(labels)[positions].float()
            terms[CE_TERM] = losses.chunked_cross_entropy_sum(
                student_hidden, student_head, targets, s.chunk_size, token_weights
            )
        if s.logit_terms and isinstance(teacher_outputs, TopKTargets):  # offline: stored top-k targets
            for kind in s.logit_terms:
                terms[kind] = chunked_topk_divergence(
                    student_hidden, student_head, teacher_outputs, kind, temperature=s.temperature, beta=s.beta,
                    skew=s.skew, vocab_size=self.vocab_size, chunk_size=s.chunk_size,
                )
        elif s.logit_terms:
            teacher_hidden = teacher_outputs.last_hidden_state[positions]
            for kind in s.logit_terms:
                terms[kind] = losses.chunked_divergence(
                    student_hidden,
                    student_head,
                    teacher_hidden,
                    teacher_head,
                    kind,
                    temperature=s.temperature,
                    beta=s.beta,
                    skew=s.skew,
                    vocab_size=self.vocab_size,
                    chunk_size=s.chunk_size,
                )
        return terms


def token_level(term: str) -> bool:
    """Whether a term is a sum over tokens (normalised by the step's token count) rather than a batch mean."""
    return term == CE_TERM or term in losses.KINDS

