"""The named set-up steps of a training run, in the order :class:`distill.training.loop.Distiller` calls them: the
data, the models, the offline teacher store, the objective, the optimizer and schedule, the teacher signal.

Each takes the config and what earlier steps built, and returns what it builds; none keeps state. The order is the
run's order on purpose: the global RNG (seeded once before the first step) initialises LoRA adapters and feature
projectors, so reordering the steps would change a run's starting weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distill.data import cross
from distill.data.batching import BatchStream
from distill.data.datasets import TokenizedDataset, build_datasets
from distill.data.packing import attention_weight
from distill.losses.cross import VocabMatch
from distill.losses.divergences import shared_vocab_size
from distill.losses.head import output_head
from distill.losses.objective import StudentWithObjective
from distill.losses.registry import Need
from distill.offline.store import TEACHER_TOKENIZER_DIR, LogitStore
from distill.runtime import inner, register_external_parameter
from distill.student.lora import apply_lora
from distill.student.models import load_student, load_teacher
from distill.student.sparsity import SparsityMasks
from distill.training.config import TrainConfig, check_batch_fits
from distill.training.on_policy import check_dataset
from distill.training.served import ServedTeacher
from distill.training.teacher import OnlineTeacher, StoreTeacher, TeacherSignal
from kd_core.config import ConfigError
from kd_core.pretrained import load_tokenizer as load_pretrained_tokenizer

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("distill")


@dataclasses.dataclass(frozen=True)
class CrossTokenizer:
    """Cross-tokenizer distillation (``loss.cross_tokenizer``): the teacher's tokenizer and, for ``gold``, the ids
    whose text maps one to one between the vocabularies (:func:`distill.data.cross.match_vocabularies`)."""

    tokenizer: PreTrainedTokenizerBase
    student_ids: list[int]
    teacher_ids: list[int]


def setup_cross_tokenizer(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> CrossTokenizer | None:
    """The teacher's own tokenizer, checked before any model loads: both give character offsets, the chat templates
    agree, and ``gold`` finds tokens to match. None without ``loss.cross_tokenizer``."""
    if not cfg.loss.cross_tokenizer:
        return None
    field, source = "model.teacher", cfg.model.teacher
    if cfg.model.teacher_tokenizer:
        field, source = "model.teacher_tokenizer", cfg.model.teacher_tokenizer
    elif cfg.loss.teacher_store:  # a store precomputed across tokenizers keeps a copy of its teacher's tokenizer
        field, source = "loss.teacher_store", str(Path(cfg.loss.teacher_store) / TEACHER_TOKENIZER_DIR)
        if not Path(source).is_dir():
            raise ConfigError(
                f"loss.teacher_store: {cfg.loss.teacher_store} holds no {TEACHER_TOKENIZER_DIR}/: it was not "
                "precomputed across tokenizers (distill precompute --student_tokenizer <the student>)"
            )
    teacher_tokenizer = load_pretrained_tokenizer(source, field)
    cross.check_pair(tokenizer, teacher_tokenizer, ("model.student", field), cfg.data.format)
    if cfg.loss.cross_tokenizer == "uld":
        return CrossTokenizer(teacher_tokenizer, [], [])
    student_ids, teacher_ids = cross.match_vocabularies(tokenizer, teacher_tokenizer, "loss.cross_tokenizer")
    logger.info(
        "gold: %d tokens match one to one between the student's %d and the teacher's %d",
        len(student_ids),
        len(tokenizer),
        len(teacher_tokenizer),
    )
    return CrossTokenizer(teacher_tokenizer, student_ids, teacher_ids)


def vocab_match(cross_tokenizer: CrossTokenizer, tokenizer: PreTrainedTokenizerBase, models: Models) -> VocabMatch:
    """Each head cropped to its own tokenizer (padding rows beyond it are never produced), refused when a
    tokenizer has more tokens than its model's head."""
    teacher_tokenizer = cross_tokenizer.tokenizer
    for name, tok, model in (("student", tokenizer, models.student), ("teacher", teacher_tokenizer, models.teacher)):
        if model is None:  # a store: precompute cropped the teacher's head to its tokenizer
            continue
        rows = model.get_output_embeddings().weight.shape[0]
        if len(tok) > rows:
            raise ConfigError(
                f"model.{name}: its tokenizer has {len(tok)} tokens but its output head {rows} rows; "
                "the tokenizer does not belong to the model"
            )
    return VocabMatch.build(
        cross_tokenizer.student_ids, cross_tokenizer.teacher_ids, len(tokenizer), len(teacher_tokenizer)
    )


def setup_served_teacher(cfg: TrainConfig, accelerator: Accelerator, tokenizer) -> ServedTeacher | None:
    """The served teacher (``model.teacher_url``), its tokenizer checked on a probe before any weights load (so a
    wrong or unreachable server costs seconds); None without one. Its ids must fall in the tokenizer (the vocabulary
    the kernels crop both sides to, :func:`~distill.losses.divergences.shared_vocab_size`)."""
    if not cfg.model.teacher_url:
        return None
    return ServedTeacher.connect(cfg, accelerator, tokenizer, len(tokenizer))


def setup_data(
    cfg: TrainConfig, tokenizer, processes: int, cross_tokenizer: CrossTokenizer | None = None
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """The training set and the held-out set of the token figures (:func:`build_datasets` leaves prompts without a
    completion out of it: they have no counted token), checked to fill one batch across ``processes``; across
    tokenizers, each example also holds the teacher's tokens and the aligned positions."""
    teacher_tokenizer = cross_tokenizer.tokenizer if cross_tokenizer is not None else None
    train_set, eval_set = build_datasets(cfg.data, tokenizer, cfg.seed, teacher_tokenizer)
    check_dataset(cfg.on_policy, train_set, cfg.data.train_file)
    check_batch_fits(len(train_set), cfg, processes)
    return train_set, eval_set


def check_task(cfg: TrainConfig, task: str) -> None:
    """An encoder student has no LM head and cannot generate: only feature and relation terms, no on-policy."""
    if task == "encoder" and cfg.on_policy.enabled:
        raise ConfigError(
            "on_policy: an encoder (model.task: encoder) cannot generate; on-policy training needs causal LMs"
        )
    if task == "encoder" and Need.STUDENT_LOGITS in cfg.loss.needs:
        raise ConfigError(
            f"loss.terms: an encoder (model.task: encoder) has no LM head; use feature/relation "
            f"terms only, got {cfg.loss.terms}"
        )


@dataclasses.dataclass
class Models:
    """The student (LoRA-wrapped when asked) and teacher of a run, and what is derived from them."""

    student: nn.Module
    teacher: nn.Module | None
    masks: SparsityMasks  # the pruned student's zeros, re-applied after every optimizer step
    packing_weight: float | None  # attention's share of the cost per token, for packed rows (None: no packing)
    vocab_size: int  # the vocabulary both heads and the tokenizer share


def setup_models(cfg: TrainConfig, task: str, tokenizer) -> Models:
    student = load_student(cfg.model, cfg.seed, task)
    # Packed rows may grow past max_length where the student's shape makes padding dearer than attention.
    packing_weight = attention_weight(student.config) if cfg.data.packing else None
    # Captured before LoRA wraps the model: zeros of the pruned weights, kept through training and merging.
    masks = SparsityMasks.capture(student) if cfg.keep_sparsity else SparsityMasks({})
    if cfg.lora.enabled:
        student = apply_lora(student, cfg.lora)
    teacher = load_teacher(cfg.model, cfg.bf16, task) if cfg.model.teacher else None
    # Across tokenizers, vocab_size is the student's own (the teacher's is in the VocabMatch).
    same = teacher is not None and not cfg.loss.cross_tokenizer
    teacher_vocab = teacher.config.vocab_size if same else student.config.vocab_size
    vocab_size = shared_vocab_size(student.config.vocab_size, teacher_vocab, len(tokenizer))
    return Models(student, teacher, masks, packing_weight, vocab_size)


def setup_store(
    cfg: TrainConfig, tokenizer, vocab_size: int, train_set: TokenizedDataset, cross_tokenizer: CrossTokenizer | None
) -> LogitStore | None:
    """Offline KD: the top-k teacher targets of ``distill precompute``, checked against this run up front (across
    tokenizers: in the teacher's vocabulary, aligned for this student)."""
    if not cfg.loss.teacher_store:
        return None
    store = LogitStore(cfg.loss.teacher_store)
    teacher_tokenizer = None if cross_tokenizer is None else cross_tokenizer.tokenizer
    if teacher_tokenizer is not None:
        vocab_size = len(teacher_tokenizer)
    store.check_compatible(
        tokenizer, vocab_size, cfg.loss.temperature, cfg.data.train_file, train_set, teacher_tokenizer
    )
    return store


def setup_objective(cfg: TrainConfig, models: Models) -> StudentWithObjective:
    """The student with its loss terms (feature terms hooked into both models)."""
    teacher_config = models.teacher.config if models.teacher is not None else None
    module = StudentWithObjective(models.student, cfg.loss, models.vocab_size, teacher_config)
    if module.features is not None:
        module.features.attach(models.student, models.teacher)
        module.features.check_batch_size(cfg.per_device_train_batch_size)
    return module


def total_steps(cfg: TrainConfig, stream: BatchStream) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return math.ceil(cfg.num_train_epochs * stream.steps_per_epoch / cfg.gradient_accumulation_steps)


def setup_optimizer(
    cfg: TrainConfig, module: nn.Module, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and the schedule over ``steps`` optimizer steps."""
    from transformers import get_scheduler

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps
    )
    return optimizer, scheduler


def check_zero3(prepared: nn.Module, models: Models, task: str, zero3: bool) -> None:
    """What ZeRO-3 needs once the student is partitioned: no sparsity masks (a partition cannot be masked), and the
    student's head registered with the objective, whose kernels read it outside ``lm_head.forward``."""
    if not zero3:
        return
    if len(models.masks):
        raise ConfigError(
            "keep_sparsity: a sparse student cannot be trained under ZeRO-3 (partitioned weights "
            "cannot be masked); use ZeRO-2 or DDP, or set keep_sparsity: false"
        )
    if task == "causal_lm":
        for parameter in output_head(models.student).parameters:  # the lm_head weight, and its bias if it has one
            register_external_parameter(inner(prepared), parameter)


def setup_teacher_signal(
    cfg: TrainConfig,
    accelerator: Accelerator,
    teacher: nn.Module | None,
    store: LogitStore | None,
    match: VocabMatch | None = None,
    served: ServedTeacher | None = None,
) -> TeacherSignal | None:
    """An online teacher (prepared for DeepSpeed where launched so; reading its own tokens when ``match`` is given),
    the served teacher (:func:`setup_served_teacher`), the store, or None: no term learns from a teacher, and none
    is kept for eval."""
    if served is not None:
        return served
    if teacher is not None:
        return OnlineTeacher.prepare(teacher, accelerator, cfg.loss, match)
    if store is not None:
        return StoreTeacher(store, accelerator.device, match)
    return None
