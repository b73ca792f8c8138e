"""Every loss term of ``loss.terms``, in one table: its name, how it is normalised, and what it needs.

A term is *token-level* when the objective returns it as a sum over counted tokens, which the step normalises by
the tokens of the whole optimizer step (all micro-batches, all ranks) -- cross-entropy and the logit divergences.
The others (feature and relation terms) are per-micro-batch means.

What a term needs decides what is computed in a step: the student's logits at counted positions (its LM head),
the teacher's next-token distribution (an online teacher's hidden states and head, or a top-k store), hidden
states or attention probabilities of both models, or the q/k/v projection outputs of one layer (recorded by
hooks). ``loss.terms`` is validated against this table once, in :class:`distill.losses.objective.LossSettings`.

Each row carries its code (``compute``): a logit divergence's row is its :class:`~distill.losses.kinds.Divergence`
(the rows of :data:`distill.losses.kinds.KINDS`, so adding a divergence touches that table only); a feature or
relation term's is its function of a :class:`~distill.losses.features.terms.FeatureBatch`. ``ce`` is the label
cross-entropy of the chunked head kernel (:func:`distill.losses.divergences.chunked_cross_entropy_sum`).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from distill.losses.features import terms as feature
from distill.losses.kinds import KINDS, Divergence

Family = Literal["labels", "divergence", "feature"]


class Need(enum.Enum):
    STUDENT_LOGITS = "student logits"  # the student's LM head applied at the counted positions
    TEACHER_LOGITS = "teacher logits"  # online: teacher hidden states + head; offline: the top-k store's targets
    HIDDEN_STATES = "hidden states"  # both models run with output_hidden_states
    ATTENTIONS = "attentions"  # both models run with output_attentions (eager attention)
    Q = "q"  # q/k/v projection outputs of one layer of both models, recorded by forward hooks
    K = "k"
    V = "v"


QKV = (Need.Q, Need.K, Need.V)


@dataclasses.dataclass(frozen=True)
class Term:
    name: str
    family: Family
    token_level: bool  # a sum over counted tokens, normalised by the step's token count; else a micro-batch mean
    needs: frozenset[Need]
    min_batch: int = 1  # relation terms relate the samples of a batch: distances need a pair, angles a triplet
    compute: Divergence | Callable[[feature.FeatureBatch], object] | None = None  # None: `ce`, the head kernel's


def _term(
    name: str,
    family: Family,
    token_level: bool,
    *needs: Need,
    min_batch: int = 1,
    compute: Divergence | Callable[[feature.FeatureBatch], object] | None = None,
) -> Term:
    return Term(name, family, token_level, frozenset(needs), min_batch, compute)


_LOGITS = (Need.STUDENT_LOGITS, Need.TEACHER_LOGITS)
# fmt: off
TERMS: dict[str, Term] = {term.name: term for term in (
    #     name                     family        token-level  needs
    _term("ce",                    "labels",     True,        Need.STUDENT_LOGITS),
    *(_term(name,                  "divergence", True,        *_LOGITS, compute=row) for name, row in KINDS.items()),
    _term("hidden_mse",            "feature",    False,       Need.HIDDEN_STATES, compute=feature.hidden_mse),
    _term("hidden_cosine",         "feature",    False,       Need.HIDDEN_STATES, compute=feature.hidden_cosine),
    _term("hidden_nmse",           "feature",    False,       Need.HIDDEN_STATES, compute=feature.hidden_nmse),
    _term("attention_transfer",    "feature",    False,       Need.ATTENTIONS, compute=feature.attention),
    _term("minilm_v1",             "feature",    False,       Need.ATTENTIONS, Need.V,
          compute=feature.minilm_attention_values),
    _term("minilm_v2",             "feature",    False,       Need.Q, Need.K, Need.V, compute=feature.minilm_relations),
    _term("rkd_distance",          "feature",    False,       Need.HIDDEN_STATES, min_batch=2,
          compute=feature.rkd_distance),
    _term("rkd_angle",             "feature",    False,       Need.HIDDEN_STATES, min_batch=3,
          compute=feature.rkd_angle),
    _term("gram",                  "feature",    False,       Need.HIDDEN_STATES, compute=feature.gram),
    _term("fsp",                   "feature",    False,       Need.HIDDEN_STATES, compute=feature.fsp),
    _term("similarity_preserving", "feature",    False,       Need.HIDDEN_STATES, min_batch=2,
          compute=feature.similarity_preserving),
)}
# fmt: on
CE = "ce"


def names(family: Family) -> tuple[str, ...]:
    """The names of one family, in table order."""
    return tuple(name for name, term in TERMS.items() if term.family == family)


DIVERGENCES = names("divergence")
FEATURE_TERMS = names("feature")


def needs(terms: Iterable[str]) -> frozenset[Need]:
    """Everything the given terms need together."""
    return frozenset().union(*(TERMS[name].needs for name in terms))


def check_weights(
    weights: Mapping[str, float], family: Family | None = None, error: type[ValueError] = ValueError
) -> None:
    """Raises ``error`` for a name the table does not know (naming the closest known one) or a negative weight.

    ``loss.terms`` is checked against every term (field-style messages, ``terms.NAME: ...``); a module that
    computes one family only and is usable on its own (:class:`~distill.losses.features.FeatureDistiller`)
    checks its argument against that ``family``.
    """
    known = sorted(TERMS) if family is None else list(names(family))
    for name, weight in weights.items():
        field = f"terms.{name}" if family is None else name
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
            raise error(
                f"{field}: unknown loss term{hint}" if family is None else f"unknown {family} loss term '{name}'{hint}"
            )
        if weight < 0:
            raise error(f"{field}: weight must be >= 0, got {weight}")
