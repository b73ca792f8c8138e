"""The teacher's side of a training step: a model run in the step, or an offline top-k store.

``distill train`` learns from one :class:`TeacherSignal`. :class:`OnlineTeacher` is a frozen model run on each
micro-batch (replicated, or partitioned by ZeRO-3: it gathers its own head for the logit kernels), on the
student's tokens or, across tokenizers (``loss.cross_tokenizer``), on its own tokens of the same text;
:class:`StoreTeacher` looks up ``distill precompute``'s top-k log-probabilities by sample id (across tokenizers,
in the teacher's vocabulary at the aligned positions). ``targets(batch)``
gives, inside a ``with`` block, the micro-batch's :class:`~distill.losses.objective.TeacherTargets`, which the
objective asks for divergences without knowing where they come from.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from distill.losses.cross import VocabMatch, chunked_cross_divergence
from distill.losses.cross_topk import chunked_cross_topk_divergence
from distill.losses.divergences import chunked_cross_entropy_sum, chunked_divergence
from distill.losses.head import OutputHead, output_head
from distill.losses.kinds import DivergenceSpec
from distill.losses.objective import LossSettings, TeacherTargets
from distill.losses.registry import Need
from distill.losses.topk import TopKTargets, chunked_topk_divergence
from distill.offline.store import LogitStore
from distill.runtime import inner, zero3_enabled, zero3_gathered

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("distill")


class TeacherSignal(abc.ABC):
    """Where the teacher's side of every micro-batch comes from."""

    model: nn.Module | None  # the plain teacher model, for held-out metrics; None for a store
    speculates = False  # whether :meth:`speculate` wants the next step's micro-batches (building them costs time)

    @abc.abstractmethod
    def targets(self, batch: dict[str, Tensor]) -> contextlib.AbstractContextManager[TeacherTargets | None]:
        """The teacher's side of one micro-batch, valid inside the ``with`` block; None when no term needs it."""

    def prefetch(self, batch: dict[str, Tensor]) -> None:
        """Starts fetching ``batch``'s targets in the background (a served teacher); nothing for the others."""
        return None  # a model or a store has its targets at hand

    def speculate(self, batches: list[dict[str, Tensor]]) -> None:
        """Starts fetching micro-batches the next step will build, while this one trains (a served teacher)."""
        return None

    def settle(self, batch: dict[str, Tensor]) -> None:
        """Waits for what :meth:`prefetch` started for ``batch``, before its forward."""
        return None

    def figures(self) -> dict[str, float]:
        """The step's figures of the waiting."""
        return {}


@dataclasses.dataclass(frozen=True)
class ModelTargets:
    """An online teacher's outputs on a micro-batch, and its output head (None when no term needs logits)."""

    outputs: ModelOutput
    head: OutputHead | None

    def divergence(
        self,
        student_hidden: Tensor,
        student_head: OutputHead,
        positions: Tensor,
        spec: DivergenceSpec,
        vocab_size: int,
    ) -> Tensor:
        """See :meth:`distill.losses.objective.TeacherTargets.divergence` (full-vocabulary chunked kernel)."""
        if self.head is None:
            raise ValueError(f"{spec.kind}: the teacher's head was not fetched (no logit term was configured)")
        teacher_hidden = self.outputs.last_hidden_state[positions]
        return chunked_divergence(student_hidden, student_head, teacher_hidden, self.head, spec, vocab_size=vocab_size)

    def label_nll_sum(self, positions: Tensor, targets: Tensor, chunk_size: int) -> float:
        """The teacher's negative log-likelihood of ``targets`` (the labels at ``positions``), summed: how likely
        the teacher finds sampled completions (on-policy figures)."""
        with torch.no_grad():
            hidden = self.outputs.last_hidden_state[positions]
            return float(chunked_cross_entropy_sum(hidden, self.head, targets, chunk_size))


@dataclasses.dataclass(frozen=True)
class StoreTargets:
    """A micro-batch's stored top-k teacher targets, one row per counted position."""

    targets: TopKTargets
    outputs: None = None  # a store holds next-token distributions only (no hidden states for feature terms)

    def divergence(
        self,
        student_hidden: Tensor,
        student_head: OutputHead,
        positions: Tensor,
        spec: DivergenceSpec,
        vocab_size: int,
    ) -> Tensor:
        """See :meth:`distill.losses.objective.TeacherTargets.divergence` (bucketed top-k kernel; the stored rows
        are already the counted ``positions``)."""
        return chunked_topk_divergence(student_hidden, student_head, self.targets, spec, vocab_size=vocab_size)


@dataclasses.dataclass(frozen=True)
class CrossTargets:
    """An online teacher's outputs on its own tokens of a micro-batch, its head, the aligned pairs ``[P, 3]`` (row,
    student position, teacher position; :func:`distill.data.cross.collate_teacher`) and the vocabulary match."""

    outputs: ModelOutput
    head: OutputHead
    pairs: Tensor
    match: VocabMatch

    def divergence(
        self,
        student_hidden: Tensor,
        student_head: OutputHead,
        positions: Tensor,
        spec: DivergenceSpec,
        vocab_size: int,
    ) -> Tensor:
        """See :meth:`distill.losses.objective.TeacherTargets.divergence` (cross-tokenizer kernel over the aligned
        pairs; ``student_hidden`` holds the counted ``positions`` in row-major order, so a pair's row in it is the
        number of counted positions before it)."""
        rows, _, t_pos = self.pairs.unbind(1)
        teacher_hidden = self.outputs.last_hidden_state[rows, t_pos]
        aligned = student_hidden.index_select(0, aligned_rows(self.pairs, positions))
        return chunked_cross_divergence(aligned, student_head, teacher_hidden, self.head, spec, self.match)


def aligned_rows(pairs: Tensor, positions: Tensor) -> Tensor:
    """Where each aligned pair's student position is among the counted ``positions [B, T]`` (row-major), i.e. its
    row in ``hidden[positions]``; every aligned position must be a counted one."""
    rows, s_pos, _ = pairs.unbind(1)
    counted = positions.reshape(-1)
    flat = rows * positions.shape[1] + s_pos
    if not bool(counted[flat].all()):
        raise ValueError("cross_pairs: an aligned student position is not a counted position")
    return (counted.long().cumsum(0) - 1)[flat]


@dataclasses.dataclass(frozen=True)
class CrossStoreTargets:
    """A micro-batch's stored top-k rows in the teacher's vocabulary (``distill precompute --student_tokenizer``),
    one per aligned pair in the order of ``pairs`` (:func:`distill.data.cross.collate_teacher`)."""

    targets: TopKTargets
    pairs: Tensor
    match: VocabMatch
    outputs: None = None

    def divergence(
        self,
        student_hidden: Tensor,
        student_head: OutputHead,
        positions: Tensor,
        spec: DivergenceSpec,
        vocab_size: int,
    ) -> Tensor:
        """See :meth:`distill.losses.objective.TeacherTargets.divergence` (offline cross-tokenizer kernel,
        :mod:`distill.losses.cross_topk`)."""
        aligned = student_hidden.index_select(0, aligned_rows(self.pairs, positions))
        return chunked_cross_topk_divergence(aligned, student_head, self.targets, spec, self.match)


class OnlineTeacher(TeacherSignal):
    """A frozen teacher model run on every micro-batch, with what the loss terms need from it; with a vocabulary
    ``match`` (cross-tokenizer distillation) it reads its own tokens of the batch (``teacher_input_ids``)."""

    def __init__(self, prepared: nn.Module, settings: LossSettings, zero3: bool, match: VocabMatch | None = None):
        self.prepared = prepared  # the DeepSpeed inference engine is kept alive with its module's ZeRO-3 hooks
        self.network = inner(prepared)
        # Held-out figures (KL, agreement) compare the models token by token: not across tokenizers.
        self.model = self.network if match is None else None
        self.settings = settings
        self.zero3 = zero3
        self.match = match
        if Need.TEACHER_LOGITS in settings.needs:
            output_head(self.network)  # refuses, up front, a family whose head the kernels cannot reproduce

    @classmethod
    def prepare(
        cls, teacher: nn.Module, accelerator: Accelerator, settings: LossSettings, match: VocabMatch | None = None
    ) -> OnlineTeacher:
        """Under DeepSpeed the teacher becomes an inference engine (sharded under ZeRO-3, replicated otherwise, as
        trl's ``prepare_deepspeed`` does); under DDP or a single process it is simply moved to the device."""
        from accelerate.utils import DistributedType

        if match is not None:
            match = match.to(accelerator.device)  # once, not per micro-batch
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            return cls(teacher.to(accelerator.device), settings, zero3=False, match=match)
        from trl.models.utils import prepare_deepspeed

        engine = prepare_deepspeed(teacher, accelerator)
        zero3 = zero3_enabled(accelerator)
        if zero3:  # each rank keeps its partition (ds_tensor) only
            held = sum(p.ds_tensor.numel() for p in engine.module.parameters())
            total = sum(p.ds_numel for p in engine.module.parameters())
            logger.info("teacher sharded by ZeRO-3: this rank holds %d of %d parameters", held, total)
        return cls(engine, settings, zero3, match)

    @contextlib.contextmanager
    def targets(self, batch: dict[str, Tensor]) -> Iterator[ModelTargets | None]:
        """Runs the teacher without gradients; under ZeRO-3 its head stays gathered for the whole block, where the
        student's forward reads it (every rank enters the gather: it is a collective)."""
        if not self.settings.needs_teacher:  # e.g. `ce` only, with a teacher kept for held-out metrics
            yield None
            return
        wanted = self.settings.needs
        prefix = "" if self.match is None else "teacher_"  # across tokenizers: the teacher's own tokens
        with torch.no_grad():
            outputs = self.network.get_decoder()(
                input_ids=batch[f"{prefix}input_ids"],
                # A packed batch (position_ids present) leaves the mask to transformers' packed-sequence masks.
                attention_mask=batch[f"{prefix}attention_mask"] if "position_ids" not in batch else None,
                position_ids=batch.get("position_ids"),
                output_hidden_states=Need.HIDDEN_STATES in wanted,
                output_attentions=Need.ATTENTIONS in wanted,
                use_cache=False,
            )
        head = output_head(self.network) if Need.TEACHER_LOGITS in wanted else None
        with zero3_gathered(head.parameters if head is not None else [], self.zero3):
            if self.match is None:
                yield ModelTargets(outputs, head)
            else:
                yield CrossTargets(outputs, head, batch["cross_pairs"], self.match)


class StoreTeacher(TeacherSignal):
    """Offline distillation: the batch's targets from a top-k store, looked up by sample id (no teacher model)."""

    def __init__(self, store: LogitStore, device: torch.device, match: VocabMatch | None = None) -> None:
        self.model = None
        self.store = store
        self.device = device
        self.match = None if match is None else match.to(device)  # across tokenizers: a store in the teacher's

    @contextlib.contextmanager
    def targets(self, batch: dict[str, Tensor]) -> Iterator[StoreTargets | CrossStoreTargets]:
        targets = self.store.targets(batch["sample_ids"].tolist(), self.device)
        if self.match is None:
            yield StoreTargets(targets)
        else:
            yield CrossStoreTargets(targets, batch["cross_pairs"], self.match)
