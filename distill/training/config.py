"""The training run's config (:class:`TrainConfig`), its keyword-only builder for programs that chain stages
(:func:`training_config`), and the checks made before anything loads: the output directory (once per run), trackers,
and that the data fills one batch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any, Literal

from distill.data.datasets import DataSettings
from distill.evaluation.metrics import AccuracySettings
from distill.losses.objective import LossSettings
from distill.student.lora import LoraSettings
from distill.student.models import ModelSettings
from distill.training.on_policy import OnPolicySettings
from kd_core import ownership
from kd_core.config import ConfigError, option, section


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = option("runs/distill", help="Where checkpoints, logs, the resolved config and the model go.")
    overwrite_output_dir: bool = option(
        False,
        help="Start a clean run in an output_dir holding an earlier training run: its checkpoints, latest, "
        "metrics, summary and final/ are removed (nothing that training did not write; never another command's "
        "directory).",
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
        OnPolicySettings,
        help="On-policy distillation: micro-batches whose completions the student (GKD) or the "
        "teacher (sequence-level KD) samples.",
    )
    lora: LoraSettings = section(LoraSettings, help="Train LoRA adapters (peft) instead of all student weights.")
    lora_export: Literal["adapter", "merged", "both"] = option(
        "both",
        help="With LoRA: export the merged model (output_dir/final), the adapter (output_dir/final/adapter), or both.",
    )
    keep_sparsity: bool = option(
        True,
        help="If the student is sparse (e.g. Wanda/N:M pruned), re-apply its zero pattern after every "
        "optimizer step so training never densifies it.",
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
        if self.model.teacher_url:
            self._check_served_teacher()
        elif self.loss.needs_teacher and not self.model.teacher:
            raise ValueError(f"model.teacher: loss terms {sorted(self.loss.terms)} need a teacher model")
        if self.loss.teacher_store and self.model.teacher:
            raise ValueError("model.teacher: leave it unset with loss.teacher_store (the store replaces the teacher)")
        if self.on_policy.enabled:
            self.on_policy.check_replay_buffer(self.per_device_train_batch_size)
            if self.loss.teacher_store:
                raise ValueError(
                    "loss.teacher_store: holds targets for the dataset's tokens only; on-policy training "
                    "(on_policy.student_fraction / teacher_fraction) needs an online model.teacher"
                )
            if not (self.model.teacher or self.model.teacher_url):
                raise ValueError(
                    "model.teacher: on-policy training (on_policy.student_fraction / teacher_fraction) needs a teacher"
                )
            if self.on_policy.student_fraction > 0 and not (self.loss.logit_terms or self.loss.feature_terms):
                raise ValueError(
                    f"loss.terms: on the student's own samples `ce` is off and only teacher terms train; "
                    f"add a logit divergence (e.g. reverse_kl or jsd), got {self.loss.terms}"
                )
        if self.loss.cross_tokenizer or self.model.teacher_tokenizer:
            self._check_cross_tokenizer()
        if self.data.packing and self.loss.feature_terms:
            raise ValueError(
                f"data.packing: feature and relation terms compare whole padded sequences; pack with "
                f"logit terms and `ce` only, got {sorted(self.loss.feature_terms)}"
            )
        if self.data.step_by_step_label_weight is not None and (self.loss.logit_terms or self.loss.feature_terms):
            # Per-example weights reach the `ce` term only; a divergence would silently ignore them.
            raise ValueError(
                f"data.step_by_step_label_weight: trains with loss.terms {{ce: 1}} only, got {self.loss.terms}"
            )

        if self.data.ce_weight_field is not None and self.loss.terms.get("ce", 0) <= 0:
            raise ValueError(
                f"data.ce_weight_field: weights the `ce` term of each row, but loss.terms has no `ce` "
                f"({self.loss.terms})"
            )

    def _check_served_teacher(self) -> None:
        """What a served teacher gives: next-token top-k log-probabilities at temperature 1 of the student's own
        tokens, row by row; so logit divergences only, unpacked rows, samples from the student only."""
        if not self.loss.logit_terms:
            raise ValueError(
                f"model.teacher_url: a served teacher gives next-token log-probabilities for logit divergences; "
                f"loss.terms has none ({self.loss.terms})"
            )
        loss, served = self.loss, "with a served teacher (model.teacher_url)"
        refused = [
            ("loss.terms", loss.feature_terms, f"feature terms {sorted(loss.feature_terms)} need hidden states"),
            ("loss.teacher_store", loss.teacher_store, "the store replaces the teacher: use one or the other"),
            ("loss.cross_tokenizer", loss.cross_tokenizer, "the server must use the student's tokenizer"),
            ("loss.temperature", loss.temperature != 1.0, "expected 1 (the server's log-probabilities are at T=1)"),
            ("data.packing", self.data.packing, "not supported (each row is scored as one sequence)"),
            (
                "on_policy.teacher_fraction",
                self.on_policy.teacher_fraction > 0,
                "expected 0 (the server scores the student's samples; it does not sample here)",
            ),
        ]
        for name, value, why in refused:
            if value:
                raise ValueError(f"{name}: {served}, {why}")

    def _check_cross_tokenizer(self) -> None:
        """What cross-tokenizer distillation supports: off-policy on dataset text, on the student's samples, and
        from a store precomputed across tokenizers; unpacked."""
        if not self.loss.cross_tokenizer:
            raise ValueError("model.teacher_tokenizer: only used with loss.cross_tokenizer (uld or gold)")
        if not (self.model.teacher or self.loss.teacher_store) or not self.model.student:
            raise ValueError(
                "loss.cross_tokenizer: needs model.student and model.teacher or a loss.teacher_store (a student "
                "built from the teacher's config shares its tokenizer)"
            )
        if self.on_policy.teacher_fraction > 0:
            raise ValueError(
                "on_policy.teacher_fraction: the teacher samples in its own tokens, which the student cannot "
                "train on token by token; across tokenizers only the student samples (on_policy.student_fraction)"
            )
        if self.data.packing:
            raise ValueError(
                "data.packing: not supported with loss.cross_tokenizer (the teacher's rows would be "
                "packed differently); set data.packing: false"
            )


def ownership_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What a run in ``output_dir`` must share with its earlier part to resume there (the marker's settings)."""
    settings = {"loss.terms": cfg.loss.terms, "model.student": cfg.model.student, "lora.enabled": cfg.lora.enabled}
    if cfg.loss.terms_at_end is not None:  # only when set: runs from before the schedule resume as they did
        settings["loss.terms_at_end"] = cfg.loss.terms_at_end
    return settings


def _is_training_run(directory: Path) -> bool:
    """A training run of a version before ownership markers."""
    import re

    import yaml

    checkpoints = any(re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir() for p in directory.glob("checkpoint-*"))
    if checkpoints or (directory / "latest").is_file():
        return True
    try:
        config = yaml.safe_load((directory / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return (directory / "summary.json").is_file() and isinstance(config, dict) and {"model", "loss"} <= set(config)


# What `distill train` writes in its output_dir (what --overwrite_output_dir removes), see kd_core.ownership.
OUTPUT = ownership.OutputKind(
    "distill train",
    (
        "config.yaml",
        "metrics.jsonl",
        "checkpoint-*",
        ".checkpoint-*.tmp",
        "latest",
        "summary.json",
        "final",
        ".final.*.tmp",
        "distill",
        ".*.tmp",
    ),
    legacy=_is_training_run,
    done="summary.json",
)


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Refuses to write over an existing run unless resuming or told to overwrite, and a directory that is not a
    training run (another command's output, a user's folder) in any case; the main process (before any process
    group exists) takes the directory's lock, until :func:`~distill.training.train.run` releases it
    (:mod:`kd_core.ownership`)."""
    if ownership.held(cfg.output_dir) is not None:  # prepared (and locked) by run(); the trainer checks again
        return Path(cfg.output_dir)
    return _prepare(cfg, cfg.output_dir).path


def _prepare(cfg: TrainConfig, out: str | Path) -> ownership.Output:
    """The one ownership check of a training run's directory, before loading and when a trainer claims it."""
    return ownership.prepare(
        out,
        OUTPUT,
        ownership_settings(cfg),
        resume=cfg.resume is not None and not cfg.overwrite_output_dir,
        overwrite=cfg.overwrite_output_dir,
        remedy="pass --resume auto to continue it (with the same settings), --overwrite_output_dir to start it again, "
        "or choose another output_dir",
    )


def claim_output_dir(cfg: TrainConfig, out: Path) -> None:
    """Main process only, once the run is checked (and resumed): with ``overwrite_output_dir``, removes the previous
    run's checkpoints, ``latest``, metrics, summary and ``final/`` (said in one line on stderr; nothing that
    training did not write), and records this run as the directory's owner (:mod:`kd_core.ownership`)."""
    output = ownership.held(out) or _prepare(cfg, out)  # held since run(); a trainer built without run() locks here
    removed = output.claim()
    if removed:
        print(
            f"overwrite_output_dir: removed the previous run in {out} ({', '.join(removed)})",
            file=sys.stderr,
            flush=True,
        )


TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def check_trackers(report_to: list[str]) -> None:
    """Every tracker ``report_to`` names is one accelerate knows and is installed (accelerate would otherwise drop
    it with a warning or fail deep inside), else one ConfigError naming it and the package to install."""
    for name in report_to:
        if name in ("none", "all"):
            continue
        if name not in TRACKER_PACKAGES:
            raise ConfigError(
                f"report_to: unknown tracker {name!r}; expected some of "
                f"{', '.join(sorted(TRACKER_PACKAGES))}, all or none"
            )
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"report_to: tracker {name!r} is not installed (pip install {package}), or leave it "
                "out (--report_to none)"
            )


def check_batch_fits(train_size: int, cfg: TrainConfig, processes: int) -> None:
    """At least one full batch (per process micro-batch x processes) of usable training examples."""
    batch = cfg.per_device_train_batch_size * processes
    if train_size < batch:
        raise ConfigError(
            f"data.train_file: {cfg.data.train_file} has {train_size} usable training example(s), fewer "
            f"than one batch (per_device_train_batch_size {cfg.per_device_train_batch_size} x "
            f"{processes} process(es) = {batch}); add data or lower per_device_train_batch_size"
        )


def training_config(
    *,
    student: str,
    train_file: str,
    output_dir: str,
    loss_terms: dict[str, float],
    teacher: str | None = None,
    eval_file: str | None = None,
    eval_fraction: float = 0.05,
    max_length: int = 512,
    packing: bool = False,
    resume: str | None = None,
    max_steps: int = -1,
    per_device_train_batch_size: int = 8,
    per_device_eval_batch_size: int = 8,
    learning_rate: float = 1e-4,
    warmup_steps: int = 0,
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear",
    save_steps: int = 500,
    save_total_limit: int | None = 2,
    eval_steps: int | None = 100,
    logging_steps: int = 10,
    seed: int = 42,
    report_to: tuple[str, ...] = ("tensorboard",),
    on_policy: OnPolicySettings | None = None,
    lora: LoraSettings | None = None,
    lora_export: Literal["adapter", "merged", "both"] = "both",
) -> TrainConfig:
    """A validated :class:`TrainConfig` for a stage of a program (the quickstart, Lion): the fields such programs
    set, flat and by keyword; every default is :class:`TrainConfig`'s own (a test keeps them equal), and the
    sections not named here keep theirs. Invalid values raise ValueError naming the field, as a YAML file would."""
    return TrainConfig(
        output_dir=output_dir,
        resume=resume,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_eval_batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        lr_scheduler_type=lr_scheduler_type,
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        eval_steps=eval_steps,
        logging_steps=logging_steps,
        seed=seed,
        report_to=list(report_to),
        model=ModelSettings(student=student, teacher=teacher),
        data=DataSettings(
            train_file=train_file,
            eval_file=eval_file,
            eval_fraction=eval_fraction,
            max_length=max_length,
            packing=packing,
        ),
        loss=LossSettings(terms=dict(loss_terms)),
        on_policy=on_policy if on_policy is not None else OnPolicySettings(),
        lora=lora if lora is not None else LoraSettings(),
        lora_export=lora_export,
    )
