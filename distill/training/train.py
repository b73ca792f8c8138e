"""``distill train``: distil a teacher into a student, single process or under ``accelerate launch`` (DDP, DeepSpeed).

The whole step is in :meth:`Distiller.training_step`: the micro-batches (with completions sampled by the student or
the teacher where ``on_policy`` says so, :mod:`distill.training.on_policy`), the teacher signal's targets
(:mod:`distill.training.teacher`), the student module returning its loss terms already normalised by the tokens of
the full optimizer step, their weighted sum, backward. Everything else here is set-up, checkpointing and logging; the workarounds for accelerate,
DeepSpeed and torch.distributed are in :mod:`distill.training.runtime`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from distill.data.batching import BatchStream
from distill.data.datasets import (
    DataSettings, attention_weight, build_datasets, collate, collate_packed, varlen_attention,
)
from distill.evaluation.embedding import embedding_metrics
from distill.evaluation.metrics import AccuracySettings, answer_accuracy, load_accuracy_set, token_metrics
from distill.losses.divergences import shared_vocab_size
from distill.losses.objective import (
    LossSettings,
    StudentWithObjective,
    TeacherTargets,
    step_token_scale,
    target_labels,
    target_positions,
)
from distill.losses.registry import Need
from distill.offline.store import LogitStore
from distill.student.lora import LoraSettings, apply_lora
from distill.student.models import (
    ModelSettings,
    check_paths,
    load_student,
    load_teacher,
    load_tokenizer,
    parameter_count,
    resolve_task,
)
from distill.student.sparsity import SparsityMasks
from distill.training import checkpoint as ckpt
from distill.training.export import export_checkpoint
from distill.training.on_policy import (
    OFF_POLICY,
    REPLAY,
    STUDENT,
    OnPolicySettings,
    Sampler,
    check_dataset,
    unwrapped_for_generation,
)
from distill.training.runtime import (
    exit_launched_process,
    inner,
    make_accelerator,
    register_external_parameter,
    zero3_enabled,
)
from distill.training.teacher import OnlineTeacher, StoreTeacher, TeacherSignal
from kd_core import ownership
from kd_core.atomic import atomic_write_json
from kd_core.commands import EXIT_PREEMPTED, PREEMPTED, stop_code
from kd_core.config import ConfigError, option, parse_command_line, save_config, section, to_dict

logger = logging.getLogger("distill")

# Exit code after a SIGTERM/SIGUSR1 (Slurm preemption): the checkpoint is saved; rerun with `--resume auto`.


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = option("runs/distill", help="Where checkpoints, logs, the resolved config and the model go.")
    overwrite_output_dir: bool = option(
        False, help="Start a clean run in an output_dir holding an earlier training run: its checkpoints, latest, "
        "metrics, summary and final/ are removed (nothing that training did not write; never another command's "
        "directory)."
    )
    resume: str | None = option(
        None, help="`auto`: continue from the newest valid checkpoint in output_dir (or start fresh); or a path."
    )
    max_steps: int = option(-1, help="Optimizer steps to run; -1 = derive from num_train_epochs.")
    num_train_epochs: float = option(1.0, help="Passes over the training set when max_steps is -1.")
    per_device_train_batch_size: int = option(8, help="Sequences per process per micro-batch.")
    per_device_eval_batch_size: int = option(8, help="Sequences per process per eval batch.")
    gradient_accumulation_steps: int = option(1, help="Micro-batches per optimizer step.")
    learning_rate: float = option(1e-4, help="Peak learning rate of AdamW.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    warmup_steps: int = option(0, help="Linear warm-up steps.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = option(
        "linear", help="Learning-rate schedule after warm-up."
    )
    max_grad_norm: float = option(1.0, help="Gradient clipping norm; 0 disables clipping.")
    save_steps: int = option(500, help="Save a checkpoint every N optimizer steps (and always at the end).")
    save_total_limit: int | None = option(2, help="Keep only the newest N checkpoints; null keeps all.")
    eval_steps: int | None = option(100, help="Evaluate KL/agreement/loss every N steps; null = only at the end.")
    logging_steps: int = option(10, help="Log training losses every N steps.")
    seed: int = option(42, help="Seed for initialisation, data order and eval split.")
    bf16: bool = option(False, help="Train in bfloat16 mixed precision (teacher in bf16 unless model.teacher_dtype).")
    report_to: list[str] = option(["tensorboard"], help="Trackers: tensorboard, wandb, ... or `none`.")
    model: ModelSettings = section(ModelSettings, help="Teacher and student.")
    data: DataSettings = section(DataSettings, help="Training and eval data.")
    loss: LossSettings = section(LossSettings, help="Loss terms and their settings.")
    on_policy: OnPolicySettings = section(
        OnPolicySettings, help="On-policy distillation: micro-batches whose completions the student (GKD) or the "
        "teacher (sequence-level KD) samples."
    )
    lora: LoraSettings = section(LoraSettings, help="Train LoRA adapters (peft) instead of all student weights.")
    lora_export: Literal["adapter", "merged", "both"] = option(
        "both", help="With LoRA: export the merged model (output_dir/final), the adapter (output_dir/final/adapter), "
        "or both."
    )
    keep_sparsity: bool = option(
        True, help="If the student is sparse (e.g. Wanda/N:M pruned), re-apply its zero pattern after every "
        "optimizer step so training never densifies it."
    )
    accuracy: AccuracySettings = section(
        AccuracySettings, help="Answer accuracy on held-out questions (greedy generation + answer extractor)."
    )

    def __post_init__(self) -> None:
        if self.overwrite_output_dir and self.resume is not None:
            raise ValueError("overwrite_output_dir: starts a clean run; it cannot be combined with resume")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps: expected a positive number or -1, got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs: expected > 0, got {self.num_train_epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: expected > 0, got {self.learning_rate}")
        if self.save_steps < 1 or self.logging_steps < 1 or (self.eval_steps is not None and self.eval_steps < 1):
            raise ValueError("save_steps, logging_steps and eval_steps must be >= 1")
        if not self.data.train_file:
            raise ValueError("data.train_file: a training dataset is required")
        if self.loss.needs_teacher and not self.model.teacher:
            raise ValueError(f"model.teacher: loss terms {sorted(self.loss.terms)} need a teacher model")
        if self.loss.teacher_store and self.model.teacher:
            raise ValueError("model.teacher: leave it unset with loss.teacher_store (the store replaces the teacher)")
        if self.on_policy.enabled:
            if self.loss.teacher_store:
                raise ValueError("loss.teacher_store: holds targets for the dataset's tokens only; on-policy training "
                                 "(on_policy.student_fraction / teacher_fraction) needs an online model.teacher")
            if not self.model.teacher:
                raise ValueError("model.teacher: on-policy training (on_policy.student_fraction / teacher_fraction) "
                                 "needs a teacher")
            if self.on_policy.student_fraction > 0 and not (self.loss.logit_terms or self.loss.feature_terms):
                raise ValueError(f"loss.terms: on the student's own samples `ce` is off and only teacher terms train; "
                                 f"add a logit divergence (e.g. reverse_kl or jsd), got {self.loss.terms}")
        if self.data.packing and self.loss.feature_terms:
            raise ValueError(f"data.packing: feature and relation terms compare whole padded sequences; pack with logit "
                             f"terms and `ce` only, got {sorted(self.loss.feature_terms)}")
        if self.data.step_by_step_label_weight is not None and (self.loss.logit_terms or self.loss.feature_terms):
            # Per-example weights reach the `ce` term only; a divergence would silently ignore them.
            raise ValueError(f"data.step_by_step_label_weight: trains with loss.terms {{ce: 1}} only, got "
                             f"{self.loss.terms}")


def ownership_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What a run in ``output_dir`` must share with its earlier part to resume there (the marker's settings)."""
    return {"loss.terms": cfg.loss.terms, "model.student": cfg.model.student, "lora.enabled": cfg.lora.enabled}


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Refuses to write over an existing run unless resuming or told to overwrite, and a directory that is not a
    training run (another command's output, a user's folder) in any case (:mod:`kd_core.ownership`). Reads only."""
    out = Path(cfg.output_dir)
    owner = ownership.check(out, ownership.TRAIN, "output_dir", "distill train")
    if owner is not None and cfg.resume is None and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir: {out} exists and is not empty; pass --resume auto to continue it, "
            "--overwrite_output_dir to reuse it, or choose another directory"
        )
    if owner is not None and cfg.resume is not None and not cfg.overwrite_output_dir:
        changed = ownership.differing(owner, ownership_settings(cfg))
        if changed:
            raise ConfigError(f"resume: {out} holds a run with other settings ({', '.join(changed)}); pass "
                              "--overwrite_output_dir to start it again, or choose another output_dir")
    return out


def claim_output_dir(cfg: TrainConfig, out: Path) -> None:
    """Main process only, once the run is checked (and resumed): with ``overwrite_output_dir``, removes the previous
    run's checkpoints, ``latest``, metrics, summary and ``final/`` (said in one line on stderr; nothing that
    training did not write), and records this run as the directory's owner (:mod:`kd_core.ownership`). An unmarked
    run of an earlier version that is resumed gets its marker here too."""
    if cfg.overwrite_output_dir and ownership.owner_of(out) is not None:
        removed = ownership.remove_owned(out, ownership.TRAIN)
        if removed:
            print(f"overwrite_output_dir: removed the previous run in {out} ({', '.join(removed)})", file=sys.stderr,
                  flush=True)
    if not (out / ownership.MARKER).is_file():
        ownership.claim(out, ownership.TRAIN, ownership_settings(cfg))


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def check_trackers(report_to: list[str]) -> None:
    """Every tracker ``report_to`` names is one accelerate knows and is installed (accelerate would otherwise drop
    it with a warning or fail deep inside), else one ConfigError naming it and the package to install."""
    import importlib.util

    for name in report_to:
        if name in ("none", "all"):
            continue
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"report_to: unknown tracker {name!r}; expected some of "
                              f"{', '.join(sorted(TRACKER_PACKAGES))}, all or none")
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"report_to: tracker {name!r} is not installed (pip install {package}), or leave it "
                              "out (--report_to none)")


def check_batch_fits(train_size: int, cfg: TrainConfig, processes: int) -> None:
    """At least one full batch (per process micro-batch x processes) of usable training examples."""
    batch = cfg.per_device_train_batch_size * processes
    if train_size < batch:
        raise ConfigError(f"data.train_file: {cfg.data.train_file} has {train_size} usable training example(s), fewer "
                          f"than one batch (per_device_train_batch_size {cfg.per_device_train_batch_size} x "
                          f"{processes} process(es) = {batch}); add data or lower per_device_train_batch_size")


class Distiller:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        check_paths(cfg.model)
        check_trackers(cfg.report_to)
        self.output_dir = prepare_output_dir(cfg)
        self.accelerator = make_accelerator(
            cfg.gradient_accumulation_steps, cfg.bf16, [t for t in cfg.report_to if t != "none"], self.output_dir,
            cfg.per_device_train_batch_size,
        )
        acc = self.accelerator
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set = build_datasets(cfg.data, self.tokenizer, cfg.seed)
        check_dataset(cfg.on_policy, self.train_set, cfg.data.train_file)
        if self.eval_set is not None and not all(e["has_completion"] for e in self.eval_set.examples):
            held = [e for e in self.eval_set.examples if e["has_completion"]]
            logger.info("eval: %d held-out prompt(s) without completion left out of the token metrics",
                        len(self.eval_set) - len(held))
            self.eval_set = type(self.eval_set)(held) if held else None
        check_batch_fits(len(self.train_set), cfg, acc.num_processes)
        self.accuracy_pairs = load_accuracy_set(cfg.accuracy) if cfg.accuracy.file else []
        self.task = resolve_task(cfg.model)
        if self.task == "encoder" and cfg.on_policy.enabled:
            raise ConfigError("on_policy: an encoder (model.task: encoder) cannot generate; on-policy training needs "
                              "causal LMs")
        if self.task == "encoder" and Need.STUDENT_LOGITS in cfg.loss.needs:
            raise ConfigError(f"loss.terms: an encoder (model.task: encoder) has no LM head; use feature/relation "
                              f"terms only, got {cfg.loss.terms}")
        student = load_student(cfg.model, cfg.seed, self.task)
        # Packed rows may grow past max_length where the student's shape makes padding dearer than attention.
        self.packing_weight = attention_weight(student.config) if cfg.data.packing else None
        # Captured before LoRA wraps the model: zeros of the pruned weights, kept through training and merging.
        self.masks = SparsityMasks.capture(student) if cfg.keep_sparsity else SparsityMasks({})
        if cfg.lora.enabled:
            student = apply_lora(student, cfg.lora)
        teacher = load_teacher(cfg.model, cfg.bf16, self.task) if cfg.model.teacher else None
        teacher_vocab = teacher.config.vocab_size if teacher is not None else student.config.vocab_size
        self.vocab_size = shared_vocab_size(student.config.vocab_size, teacher_vocab, len(self.tokenizer))
        store = None
        if cfg.loss.teacher_store:  # offline KD: top-k teacher targets from `distill precompute`, checked up front
            store = LogitStore(cfg.loss.teacher_store)
            store.check_compatible(self.tokenizer, self.vocab_size, cfg.loss.temperature, cfg.data.train_file,
                                   self.train_set)
        teacher_config = teacher.config if teacher is not None else None
        module = StudentWithObjective(student, cfg.loss, self.vocab_size, teacher_config)
        if module.features is not None:
            module.features.attach(student, teacher)
            module.features.check_batch_size(cfg.per_device_train_batch_size)
        self.stream = BatchStream(
            len(self.train_set), cfg.per_device_train_batch_size, acc.num_processes, acc.process_index, cfg.seed
        )
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
            cfg.num_train_epochs * self.stream.steps_per_epoch / cfg.gradient_accumulation_steps
        )
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        from transformers import get_scheduler

        scheduler = get_scheduler(
            cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=self.total_steps
        )
        self.module, self.optimizer, self.scheduler = acc.prepare(module, optimizer, scheduler)
        self.zero3 = zero3_enabled(acc)
        if self.zero3 and len(self.masks):
            raise ConfigError("keep_sparsity: a sparse student cannot be trained under ZeRO-3 (partitioned weights "
                              "cannot be masked); use ZeRO-2 or DDP, or set keep_sparsity: false")
        if self.zero3 and self.task == "causal_lm":
            register_external_parameter(inner(self.module), student.get_output_embeddings().weight)
        self.teacher: TeacherSignal | None = None  # None: no term learns from a teacher, and none is kept for eval
        if teacher is not None:
            self.teacher = OnlineTeacher.prepare(teacher, acc, cfg.loss)
        elif store is not None:
            self.teacher = StoreTeacher(store, acc.device)
        self.sampler = None
        if cfg.on_policy.enabled:
            self.sampler = Sampler(cfg.on_policy, cfg.seed, acc.process_index, acc.device)
        self.step = 0
        self.stop_signal: int | None = None
        self.metrics_file = self.output_dir / "metrics.jsonl"

    # ---------------------------------------------------------------------------------------------------------
    # The step
    # ---------------------------------------------------------------------------------------------------------

    def next_micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], list[str], list[dict[str, float]]]:
        """The step's micro-batches, where each one's completions came from (:mod:`distill.training.on_policy`),
        and the sampling figures of each."""
        batches, sources, stats = [], [], []
        for _ in range(self.cfg.gradient_accumulation_steps):
            examples = [self.train_set[i] for i in self.stream.next_indices()]
            source, figures = OFF_POLICY, {}
            if self.sampler is not None:
                source = self.sampler.draw(len(examples))
                if source == REPLAY:
                    examples, figures = self.sampler.replay(len(examples))
                elif source != OFF_POLICY:
                    examples, figures = self.sample(examples, source)
            pad = self.tokenizer.pad_token_id
            if self.cfg.data.packing:
                batch = collate_packed(examples, pad, self.cfg.data.max_length, self.packing_weight,
                                       varlen_attention(self.cfg.model.attn_implementation))
            else:
                batch = collate(examples, pad)
            batches.append({k: v.to(self.accelerator.device) for k, v in batch.items()})
            sources.append(source)
            stats.append(figures)
        return batches, sources, stats

    def sample(self, examples: list[dict[str, Any]], source: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """The examples with completions sampled by the student or the teacher (weights gathered under ZeRO-3, so
        every rank generates on its own: no ``synced_gpus``)."""
        prepared = self.module if source == STUDENT else self.teacher.prepared
        with unwrapped_for_generation(prepared, self.accelerator) as model:
            model = model.student if source == STUDENT else model
            return self.sampler.sample(model, examples, self.tokenizer, self.cfg.data.max_length, source)

    def teacher_targets(
        self, batch: dict[str, torch.Tensor]
    ) -> contextlib.AbstractContextManager[TeacherTargets | None]:
        """The teacher's side of a micro-batch (see :class:`TeacherSignal`); None without a teacher."""
        return self.teacher.targets(batch) if self.teacher is not None else contextlib.nullcontext()

    def training_step(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the step's term values."""
        acc, weights = self.accelerator, self.cfg.loss.terms
        micro_batches, sources, sampling = self.next_micro_batches()
        token_scale = step_token_scale(
            [b["labels"] for b in micro_batches], lambda t: acc.reduce(t.to(acc.device), reduction="sum"),
            acc.num_processes, self.cfg.gradient_accumulation_steps,
        )
        logged: dict[str, float] = {}
        teacher_logprobs: list[tuple[float, int]] = []
        for batch, source in zip(micro_batches, sources):
            with acc.accumulate(self.module):
                with self.teacher_targets(batch) as teacher:
                    terms = self.module(
                        batch["input_ids"], batch["attention_mask"], batch["labels"], teacher=teacher,
                        loss_weights=batch["loss_weights"], token_scale=token_scale,
                        position_ids=batch.get("position_ids"),
                    )
                    if source in (STUDENT, REPLAY) and (self.step + 1) % self.cfg.logging_steps == 0:
                        teacher_logprobs.extend(self.teacher_logprob(teacher, batch["labels"]))
                loss = sum(weights[k] * v for k, v in terms.items())
                acc.backward(loss)
                if acc.sync_gradients and self.cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
                self.optimizer.step()
                if acc.sync_gradients:  # once per optimizer step, whatever the number of processes
                    self.scheduler.step()
                self.optimizer.zero_grad()
                if acc.sync_gradients and len(self.masks):
                    self.masks.apply(inner(self.module).student)  # pruned zeros stay zero
            for k, v in terms.items():  # per-step value: token terms sum to the step mean, others average
                share = 1.0 / (acc.num_processes * self.cfg.gradient_accumulation_steps)
                logged[k] = logged.get(k, 0.0) + v.detach().item() * share
            logged["loss"] = logged.get("loss", 0.0) + loss.detach().item() / (
                acc.num_processes * self.cfg.gradient_accumulation_steps
            )
        if self.sampler is not None:  # every rank has the same sources, so the same keys
            logged.update(on_policy_figures(sources, sampling, teacher_logprobs, acc.num_processes))
        totals = acc.reduce(torch.tensor(list(logged.values()), dtype=torch.float64, device=acc.device), "sum")
        return dict(zip(logged, totals.tolist()))

    def teacher_logprob(self, teacher, labels: torch.Tensor) -> list[tuple[float, int]]:
        """The teacher's summed log-probability of a micro-batch's sampled tokens and their count (logged on logging
        steps; it needs the teacher's logits, so nothing with feature terms only)."""
        if teacher is None or getattr(teacher, "head", None) is None:
            return []
        positions = target_positions(labels)
        targets = target_labels(labels, positions)
        return [(-teacher.label_nll_sum(positions, targets, self.cfg.loss.chunk_size), int(positions.sum()))]

    # ---------------------------------------------------------------------------------------------------------
    # Evaluation, checkpoints, signals
    # ---------------------------------------------------------------------------------------------------------

    def answer_accuracy(self) -> dict[str, float]:
        """``eval/answer_accuracy`` on ``accuracy.file``: each process generates for its shard, counts are summed."""
        if not self.accuracy_pairs:
            return {}
        if self.zero3:
            raise ConfigError("accuracy.file: generation under ZeRO-3 is not supported; evaluate the exported model")
        acc = self.accelerator
        student = inner(self.module).student
        student.eval()
        metrics = answer_accuracy(
            student, self.tokenizer, self.accuracy_pairs[acc.process_index :: acc.num_processes], self.cfg.accuracy,
            reduce=lambda t: acc.reduce(t.to(acc.device), "sum").cpu(),
        )
        student.train()
        return {f"eval/{k}": v for k, v in metrics.items()}

    def eval_batches(self, indices: list[int]):
        size = self.cfg.per_device_eval_batch_size
        for j in range(0, len(indices), size):
            batch = collate([self.eval_set[i] for i in indices[j : j + size]], self.tokenizer.pad_token_id)
            yield {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def evaluate(self) -> dict[str, float]:
        accuracy = self.answer_accuracy()
        if self.eval_set is None:
            return accuracy
        acc = self.accelerator
        student = inner(self.module).student
        student.eval()
        teacher = self.teacher.model if self.teacher is not None else None
        if self.task == "encoder":  # retrieval needs the whole set: every process embeds all of it
            metrics = {} if teacher is None else embedding_metrics(
                student, teacher, self.eval_batches(list(range(len(self.eval_set)))), self.cfg.loss.features.pooling
            )
        else:
            metrics = token_metrics(
                student, teacher, self.eval_batches(list(range(acc.process_index, len(self.eval_set), acc.num_processes))),
                self.vocab_size, reduce=lambda t: acc.reduce(t.to(acc.device), "sum").cpu(), zero3=self.zero3,
            )
        student.train()
        return {**accuracy, **{f"eval/{k}": v for k, v in metrics.items()}}

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_consumed": self.stream.samples_consumed,
            "epoch": self.stream.epoch,
            "seed": self.cfg.seed,
            "world_size": self.accelerator.num_processes,
            "student_config": inner(self.module).student.config.to_diff_dict(),
            "loss_terms": self.cfg.loss.terms,
            "train_file": self.cfg.data.train_file,
        }

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.accelerator, self.output_dir, self.step, self.trainer_state(), self.cfg.save_total_limit,
            write_extra=self.write_checkpoint_extras,
            write_rank_files=self.sampler.save if self.sampler is not None else None,
        )

    def write_checkpoint_extras(self, directory: Path) -> None:
        """The resolved config, and the student's config and tokenizer so that ``distill export`` rebuilds the
        model from the checkpoint alone (written before the manifest, so they are covered by it)."""
        save_config(self.cfg, directory / "config.yaml")
        inner(self.module).student.config.save_pretrained(directory / ckpt.STUDENT_DIR)
        self.tokenizer.save_pretrained(directory / ckpt.STUDENT_DIR)

    def resume(self) -> None:
        if self.cfg.resume is None:
            return
        if self.cfg.resume == "auto":
            found = ckpt.find_resume_checkpoint(self.output_dir, self.accelerator)
            if found is None:
                logger.info("no checkpoint in %s: starting fresh", self.output_dir)
                return
        else:
            found = Path(self.cfg.resume)
            problem = ckpt.validate(found, self.accelerator) if found.is_dir() else "not a directory"
            if problem:
                raise ConfigError(f"resume: cannot use checkpoint {found}: {problem}")
        state = ckpt.read_state(found)
        self.check_compatible(state, found)
        self.accelerator.load_state(str(found))
        self.step = state["step"]
        self.stream.resume_at(state["samples_consumed"], state["world_size"])
        if self.sampler is not None and not self.sampler.load(found):
            logger.warning("%s holds no on-policy sampler state for rank %d: sampling continues from the seed (the "
                           "samples differ from an uninterrupted run)", found, self.accelerator.process_index)
        logger.info("resumed from %s at step %d", found, self.step)

    def check_compatible(self, state: dict[str, Any], path: Path) -> None:
        mine = self.trainer_state()
        for key in ("student_config", "loss_terms"):
            if state[key] != mine[key]:
                differing = sorted(
                    k for k in set(state[key]) | set(mine[key]) if state[key].get(k) != mine[key].get(k)
                )
                details = ", ".join(f"{k}: checkpoint {state[key].get(k)!r} vs now {mine[key].get(k)!r}"
                                    for k in differing[:5])
                raise ConfigError(f"resume: checkpoint {path} has a different {key.replace('_', ' ')} ({details})")

    def install_signal_handlers(self) -> None:
        def request_stop(signum, _frame) -> None:
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def stop_requested(self) -> bool:
        """Whether any rank received a stop signal (all ranks must agree to save together)."""
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    def log(self, values: dict[str, float]) -> None:
        values = {"step": self.step, **values}
        self.accelerator.log({k: v for k, v in values.items() if k != "step"}, step=self.step)
        if self.accelerator.is_main_process:
            with open(self.metrics_file, "a") as handle:
                handle.write(json.dumps(values) + "\n")

    # ---------------------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        self.resume()
        if acc.is_main_process:
            claim_output_dir(cfg, self.output_dir)
            save_config(cfg, self.output_dir / "config.yaml")
        acc.wait_for_everyone()
        acc.init_trackers("distill", config=_flat(to_dict(cfg)))
        self.install_signal_handlers()
        inner(self.module).student.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="distill", disable=not acc.is_main_process)
        history: list[dict[str, float]] = []
        window: list[dict[str, float]] = []
        started = time.time()
        while self.step < self.total_steps:
            step_started = time.perf_counter()
            values = self.training_step()
            values["step_seconds"] = time.perf_counter() - step_started
            self.step += 1
            window.append(values)
            bar.update(1)
            postfix = {"loss": f"{values['loss']:.4f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"}
            if self.sampler is not None:  # the share of the step spent sampling
                postfix["sampling"] = f"{values.get('on_policy/sample_seconds', 0.0) / values['step_seconds']:.0%}"
            bar.set_postfix(postfix)
            if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                # Averaged over the steps that have the figure (sampling figures exist on sampled steps only).
                keys = dict.fromkeys(k for w in window for k in w)
                averaged = {f"train/{k}": sum(w[k] for w in window if k in w) / sum(k in w for w in window)
                            for k in keys}
                averaged["train/lr"] = self.scheduler.get_last_lr()[0]
                self.log(averaged)
                history.append({"step": self.step, **averaged})
                window = []
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                self.log(self.evaluate())
            stop = self.stop_requested()
            if self.step % cfg.save_steps == 0 or stop:
                self.save()
            if stop:
                bar.close()
                logger.warning("stop signal received: checkpoint saved at step %d; exiting", self.step)
                acc.end_training()
                raise SystemExit(EXIT_PREEMPTED)
        bar.close()
        final_eval = self.evaluate()
        if final_eval:
            self.log(final_eval)
        if not (self.output_dir / f"{ckpt.PREFIX}{self.step}").exists():
            self.save()
        self.export(self.output_dir / "final")
        acc.end_training()
        summary = {
            "steps": self.step,
            "train_seconds": time.time() - started,
            "student_parameters": parameter_count(inner(self.module).student),
            "final_eval": final_eval,
            "history": history,
        }
        if acc.is_main_process:
            atomic_write_json(self.output_dir / "summary.json", summary)
            ownership.mark_finished(self.output_dir)
        return summary

    def export(self, directory: Path) -> None:
        """A Hugging Face model directory of the student alone (gathered from ZeRO-3 shards), with the tokenizer.
        With LoRA: the merged model and/or the adapter (``final/adapter``), as ``lora_export`` says."""
        acc = self.accelerator
        if self.cfg.lora.enabled:
            # Through the final checkpoint, whose consolidation also gathers ZeRO-3-sharded adapters: one code path
            # for every launch mode. The merge re-applies the frozen base weights' zeros (never densifies).
            if acc.is_main_process:
                export_checkpoint(self.output_dir / f"{ckpt.PREFIX}{self.step}", directory)
            acc.wait_for_everyone()
            return
        state = acc.get_state_dict(self.module)  # collective under ZeRO-3: every rank calls it
        if acc.is_main_process:
            student_state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
            student = inner(self.module).student
            student.save_pretrained(directory, state_dict=student_state)
            self.tokenizer.save_pretrained(directory)
        acc.wait_for_everyone()


def on_policy_figures(
    sources: list[str], sampling: list[dict[str, float]], teacher_logprobs: list[tuple[float, int]], processes: int
) -> dict[str, float]:
    """A step's sampling figures as this rank's share of the all-rank mean (the step's values are summed over
    ranks): sampled fraction, seconds spent sampling, mean sampled length, student and teacher log-probabilities per
    sampled token (the teacher's on logging steps only)."""
    figures = {"on_policy/sampled_fraction": sum(s != OFF_POLICY for s in sources) / len(sources) / processes}
    sampled = [f for f in sampling if f]
    if sampled:
        figures["on_policy/sample_seconds"] = sum(f["on_policy/sample_seconds"] for f in sampled) / processes
        for key in ("on_policy/sampled_length", "on_policy/student_logprob"):
            values = [f[key] for f in sampled if key in f]
            if values:
                figures[key] = sum(values) / len(values) / processes
    if teacher_logprobs:
        tokens = sum(n for _, n in teacher_logprobs)
        figures["on_policy/teacher_logprob"] = sum(lp for lp, _ in teacher_logprobs) / max(tokens, 1) / processes
    return figures


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Trackers take flat scalar hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "DeepSpeed", "deepspeed"):  # per-file save messages drown the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)


Config = TrainConfig


@dataclasses.dataclass
class TrainResult:
    """What :func:`run` returns."""

    output_dir: Path
    steps: int  # optimizer steps done (the checkpointed step when preempted)
    summary: dict[str, Any] | None  # the content of summary.json; None when preempted
    stopped: str | None = None  # kd_core.commands.PREEMPTED after a SIGTERM/SIGUSR1 save; None = finished


def run(cfg: TrainConfig) -> TrainResult:
    """Trains (resuming as ``cfg.resume`` says) and exports ``final/``; on SIGTERM/SIGUSR1 it saves a checkpoint
    and returns with ``stopped`` set. ``--resume auto`` on a finished run says so and returns its summary, rewriting
    nothing."""
    out = prepare_output_dir(cfg)
    summary_file = out / "summary.json"  # prepare_output_dir checked it belongs to a training run
    summary = json.loads(summary_file.read_text()) if cfg.resume == "auto" and summary_file.is_file() else None
    # A larger max_steps extends a finished run from its last checkpoint (as Trainer's resume does); otherwise the
    # run is done and nothing may be rewritten.
    if summary is not None and (cfg.max_steps is None or cfg.max_steps <= summary.get("steps", 0)):
        print(f"distill train: {out} holds a finished run ({summary.get('steps')} steps); nothing to do (pass "
              "--overwrite_output_dir to train it again, or choose another output_dir)", file=sys.stderr, flush=True)
        return TrainResult(out, summary.get("steps", 0), summary)
    distiller = Distiller(cfg)
    try:
        summary = distiller.train()
    except SystemExit as stop:  # the preemption exit, after a completed save
        if stop.code != EXIT_PREEMPTED:
            raise
        return TrainResult(Path(cfg.output_dir), distiller.step, None, PREEMPTED)
    return TrainResult(Path(cfg.output_dir), summary["steps"], summary)


def main(argv: list[str]) -> int:
    setup_logging()
    cfg = parse_command_line(TrainConfig, argv, "distill train", __doc__)
    return exit_launched_process(stop_code(run(cfg).stopped))
