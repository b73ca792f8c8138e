"""``distill quickstart``: the whole pipeline on a laptop CPU in minutes, with nothing downloaded.

Stages, each in its own folder of ``output_dir`` and each resumable (an interrupted run continues the stage it was
in; finished stages are skipped):

1. ``data/``: multi-step arithmetic word problems with worked rationales, generated from the seed
   (``distill.data.synthetic``); ``train.jsonl`` (gold rationales), ``train_labels.jsonl`` (gold answers only) and the
   held-out ``eval.jsonl``.
2. ``teacher/``: a byte-level BPE tokenizer and a small Llama trained on the gold rationales (plain CE).
3. ``cot/``: ``data-gen cot`` with that teacher on the local backend: its rationales for the training questions,
   kept only when their answer matches the gold one.
4. ``student_init/``: the teacher pruned by ``distill prune`` (fewer layers by Block Influence, narrower MLP).
5. ``students/labels``, ``students/rationales``, ``students/distilled``: the pruned student fine-tuned on gold
   answers only (CE), on the teacher's rationales (CE), and distilled on the teacher's rationales with logit +
   feature losses (``loss_terms``), in full or with LoRA (``lora.enabled``).
6. ``students/on_policy``: the rationale-trained student continued with on-policy distillation (``on_policy``): it
   samples completions for the training questions and learns the teacher's distribution on them token by token
   (JSD by default; GKD, Agarwal et al., 2024).
7. ``eval/``: ``distill eval`` figures of the six models on the held-out problems.
8. ``report.md`` / ``report.json`` and ``plots/``: accuracies, parameters, speeds, training curves.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from distill.losses.objective import LossSettings
from distill.student.lora import LoraSettings
from distill.training.on_policy import OnPolicySettings
from kd_core import ownership
from kd_core.atomic import atomic_directory, atomic_write_json, atomic_write_text
from kd_core.commands import Stopped, stop_code
from kd_core.config import ConfigError, option, parse_command_line, save_config, section, to_dict

REPORT = "report.json"
CONFIG = "config.yaml"


@dataclasses.dataclass
class OnPolicyStudent:
    steps: int = option(200, help="Optimizer steps of the on-policy continuation of the rationale-trained student.")
    terms: dict[str, float] = option(
        {"jsd": 1.0},
        help="Loss terms on the sampled completions: a logit divergence to the teacher "
        "(jsd, reverse_kl, ... see docs/losses.md; here jsd lowered the KL to the teacher where reverse_kl "
        "raised it); `ce` is off on the student's own samples.",
    )
    student_fraction: float = option(
        1.0, help="Fraction of batches the student samples (GKD's lambda); the others train on the gold rationales."
    )
    temperature: float = option(1.0, help="Sampling temperature of the student's completions.")
    max_new_tokens: int = option(64, help="Longest sampled completion, in tokens (a worked answer's length).")
    learning_rate: float = option(
        1e-3, help="Peak learning rate (the student starts trained, so lower than learning_rate)."
    )

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: expected > 0, got {self.learning_rate}")
        if not 0.0 < self.student_fraction <= 1.0:
            raise ValueError(f"student_fraction: expected a number in (0, 1], got {self.student_fraction}")
        if not set(self.terms) - {"ce"}:
            raise ValueError(
                f"terms: `ce` is off on the student's own samples, so a divergence to the teacher is "
                f"needed (e.g. reverse_kl or jsd), got {self.terms}"
            )
        self.settings()  # validates temperature and max_new_tokens
        LossSettings(terms=dict(self.terms))  # an unknown term is refused now, not after the stages before this one

    def settings(self) -> OnPolicySettings:
        """``distill train``'s ``on_policy`` section for this stage."""
        return OnPolicySettings(
            student_fraction=self.student_fraction, max_new_tokens=self.max_new_tokens, temperature=self.temperature
        )


@dataclasses.dataclass
class QuickstartConfig:
    output_dir: str = option("runs/quickstart", help="Directory for every stage's outputs and the report.")
    overwrite: bool = option(
        False, help="Replace an existing quickstart in output_dir (removing only what it wrote) and start again."
    )
    seed: int = option(0, help="Seed for the problems, the models and the data order.")
    num_train: int = option(3000, help="Training problems.")
    num_eval: int = option(200, help="Held-out problems for every figure of the report.")
    problem_steps: list[int] = option([2, 4], help="Fewest and most steps (+ or -) of a problem.")
    problem_start: int = option(30, help="Largest first count of a problem (it is drawn from 2..problem_start).")
    problem_amount: int = option(20, help="Largest amount a step adds (a step that takes away leaves at least 1).")
    vocab_size: int = option(384, help="Size of the BPE tokenizer trained on the problems.")
    teacher_layers: int = option(4, help="Teacher depth.")
    teacher_hidden: int = option(128, help="Teacher width.")
    teacher_steps: int = option(1000, help="Optimizer steps to train the teacher on the gold rationales.")
    cot_samples: int = option(2, help="Rationales the teacher samples per training question (data-gen cot k).")
    cot_temperature: float = option(0.5, help="Sampling temperature of the teacher's rationales.")
    student_layers: int = option(1, help="Layers kept by pruning (Block Influence on the training problems).")
    student_intermediate_size: int | None = option(
        256, help="MLP channels kept by pruning (activation importance); null keeps the teacher's."
    )
    student_steps: int = option(400, help="Optimizer steps of each of the three student trainings.")
    batch_size: int = option(32, help="Sequences per step.")
    learning_rate: float = option(3e-3, help="Peak learning rate of every training (tiny models like it high).")
    loss_terms: dict[str, float] = option(
        {"forward_kl": 0.7, "hidden_mse": 0.2, "ce": 0.1},
        help="Loss terms and weights of the distilled student: logit (forward_kl, ...) and feature (hidden_mse, "
        "...) terms, see docs/losses.md and docs/features.md.",
    )
    lora: LoraSettings = section(LoraSettings, help="Train the students with LoRA adapters instead of in full.")
    max_new_tokens: int = option(64, help="Greedy generation length when measuring accuracy.")
    on_policy: OnPolicyStudent = section(
        OnPolicyStudent,
        help="The on-policy student: the rationale-trained student continued on its own samples, "
        "scored token by token by the teacher.",
    )

    def __post_init__(self) -> None:
        for name in (
            "num_train",
            "num_eval",
            "teacher_steps",
            "student_steps",
            "batch_size",
            "teacher_layers",
            "teacher_hidden",
            "student_layers",
            "cot_samples",
            "max_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_train < self.batch_size:
            raise ValueError(f"num_train: expected at least batch_size ({self.batch_size}), got {self.num_train}")
        if self.student_layers > self.teacher_layers:
            raise ValueError(f"student_layers: expected at most teacher_layers ({self.teacher_layers})")
        if self.teacher_hidden % 32:
            raise ValueError(
                f"teacher_hidden: expected a multiple of 32 (heads of 32 channels), got {self.teacher_hidden}"
            )
        if self.cot_temperature < 0:
            raise ValueError(f"cot_temperature: expected >= 0, got {self.cot_temperature}")
        if not self.loss_terms:
            raise ValueError("loss_terms: expected at least one term")
        if len(self.problem_steps) != 2 or not 1 <= self.problem_steps[0] <= self.problem_steps[1]:
            raise ValueError(
                f"problem_steps: expected [fewest, most] with 1 <= fewest <= most, got {self.problem_steps}"
            )
        if self.problem_start < 2 or self.problem_amount < 1:
            raise ValueError(
                f"problem_start, problem_amount: expected >= 2 and >= 1, got {self.problem_start} and "
                f"{self.problem_amount}"
            )


# ------------------------------------------------------------------------------------------------------------------
# Output directory: refuse, resume or start
# ------------------------------------------------------------------------------------------------------------------


def _comparable(cfg: QuickstartConfig) -> dict[str, Any]:
    settings = to_dict(cfg)
    settings.pop("overwrite")
    settings.pop("output_dir")
    return settings


# What the quickstart writes in its output_dir (kd_core.ownership); an unmarked quickstart of an earlier version is
# recognised by its report or its config.
OUTPUT = ownership.OutputKind(
    "distill quickstart",
    (
        "config.yaml",
        "timings.json",
        "data",
        "teacher_init",
        "teacher",
        "cot",
        "student_init",
        "prune_cache",
        "students",
        "eval",
        "plots",
        "report.md",
        "report.json",
        ".*.tmp",
    ),
    label="quickstart",
    done=REPORT,
    legacy=lambda d: (d / REPORT).is_file() or {"teacher_steps", "cot_samples", "student_steps"} <= set(_saved(d)),
)


def _saved(root: Path) -> dict[str, Any]:
    """The quickstart settings saved in ``root/config.yaml`` (empty when absent or unreadable)."""
    try:
        saved = yaml.safe_load((root / CONFIG).read_text()) if (root / CONFIG).is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in saved.items() if k not in ("overwrite", "output_dir")} if isinstance(saved, dict) else {}


def prepare_output_dir(cfg: QuickstartConfig) -> ownership.Output:
    """An empty or absent directory starts a run; an unfinished quickstart with the same settings resumes; a
    finished one or other settings are refused unless ``overwrite``, which then removes only what the quickstart
    wrote; a directory that is not a quickstart (another command's output, a user's folder) or that another process
    writes is always refused (:mod:`kd_core.ownership`). The returned output holds the directory's lock: release
    it when the run ends."""
    root = Path(cfg.output_dir)

    def resumable(owner: ownership.Owner) -> str | None:
        if (root / REPORT).exists():
            return "holds a finished quickstart"
        if not (root / CONFIG).is_file():
            return "holds an unfinished quickstart without its config.yaml"
        now = json.loads(json.dumps(_comparable(cfg)))
        changed = sorted(k for k in set(_saved(root)) | set(now) if _saved(root).get(k) != now.get(k))
        return f"holds an unfinished quickstart with other settings ({', '.join(changed)})" if changed else None

    output = ownership.prepare(
        root,
        OUTPUT,
        _comparable(cfg),
        resume=True,
        overwrite=cfg.overwrite,
        check=resumable,
        remedy="pass --overwrite to replace it, or another --output_dir",
    )
    try:
        if output.replace:
            removed = output.claim()
            print(
                f"quickstart: --overwrite: removed the earlier quickstart's {', '.join(removed) or 'marker'} in {root}",
                file=sys.stderr,
                flush=True,
            )
        else:
            if output.resumed:
                print(f"quickstart: resuming the unfinished run in {root}")
            output.claim()
        save_config(cfg, root / CONFIG)
    except BaseException:
        output.release()
        raise
    return output


# ------------------------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))  # a killed run leaves no half file


def make_data(cfg: QuickstartConfig, data: Path) -> list[dict[str, Any]]:
    from distill.data.synthetic import make_problems

    problems = make_problems(
        cfg.num_train + cfg.num_eval, cfg.seed, tuple(cfg.problem_steps), cfg.problem_start, cfg.problem_amount
    )
    if not (data / "eval.jsonl").exists():
        data.mkdir(parents=True, exist_ok=True)
        train = problems[: cfg.num_train]
        _write_jsonl(data / "train.jsonl", train)
        # "Gold labels only": the same questions with the final answer and no worked rationale.
        _write_jsonl(
            data / "train_labels.jsonl",
            [{"prompt": p["prompt"], "completion": f"The answer is {p['label']}.", "label": p["label"]} for p in train],
        )
        _write_jsonl(data / "eval.jsonl", problems[cfg.num_train :])  # last: it marks the stage as done
    return problems


def make_teacher_init(cfg: QuickstartConfig, problems: list[dict[str, Any]], path: Path) -> None:
    from distill.data.synthetic import corpus_for_tokenizer
    from distill.student.tiny import tiny_llama, train_tokenizer

    if (path / "config.json").exists():
        return
    tokenizer = train_tokenizer(corpus_for_tokenizer(problems), vocab_size=cfg.vocab_size)
    model = tiny_llama(
        len(tokenizer),
        hidden_size=cfg.teacher_hidden,
        num_layers=cfg.teacher_layers,
        num_heads=cfg.teacher_hidden // 32,
        seed=cfg.seed,
    )
    with atomic_directory(path) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)


def train_stage(
    cfg: QuickstartConfig,
    out: Path,
    *,
    train_file: Path,
    eval_file: Path,
    student: Path,
    teacher: Path | None = None,
    terms: dict[str, float],
    steps: int,
    lora: bool,
    batch_size: int | None = None,
    on_policy: OnPolicySettings | None = None,
    learning_rate: float | None = None,
) -> Path:
    """``distill train`` in-process, resumable; skipped when the stage already finished. Returns ``final/``.
    ``batch_size`` (default ``cfg.batch_size``) is smaller only when the teacher kept fewer rationales than that;
    ``on_policy`` makes the student (or teacher) sample the completions; ``learning_rate`` defaults to
    ``cfg.learning_rate``."""
    from distill.training import train
    from distill.training.config import training_config

    if (out / "summary.json").exists():
        print(f"quickstart: {out.name}: finished earlier, skipped")
        return out / "final"
    loss = LossSettings(terms=dict(terms))
    train_cfg = training_config(
        student=str(student),
        teacher=str(teacher) if teacher else None,
        train_file=str(train_file),
        eval_file=str(eval_file),
        output_dir=str(out),
        loss_terms=terms,
        max_length=128,
        # Packed rows (no padding) wherever the terms allow: same loss, fewer tokens run.
        packing=not loss.feature_terms,
        resume="auto",  # a rerun after an interruption continues the stage from its last checkpoint
        max_steps=steps,
        per_device_train_batch_size=batch_size or cfg.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=learning_rate or cfg.learning_rate,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        save_steps=max(1, steps // 4),
        save_total_limit=1,
        eval_steps=max(1, steps // 4),
        logging_steps=max(1, steps // 50),
        seed=cfg.seed,
        report_to=("tensorboard",),
        on_policy=on_policy,
        lora=dataclasses.replace(cfg.lora, enabled=lora and cfg.lora.enabled),
        lora_export="merged",
    )
    result = train.run(train_cfg)
    if result.stopped:
        raise Stopped(result.stopped)  # preempted: the checkpoint is saved, a rerun continues the stage
    return out / "final"


def make_rationales(cfg: QuickstartConfig, teacher: Path, data: Path, out: Path) -> Path:
    """``data-gen cot`` with the local teacher: rationales for the training questions, verified against gold."""
    from data_gen import cot as cot_command
    from data_gen.config import DecodingConfig, OutputConfig, TeacherConfig
    from data_gen.cot import PromptConfig

    rows = out / "data.jsonl"
    if (out / "stats.json").exists() and rows.exists():
        print("quickstart: cot: finished earlier, skipped")
        return _check_rationales(cfg, out)
    cot = cot_command.Config(
        input_file=str(data / "train.jsonl"),
        question_field="question",
        answer_field="answer",  # gold number after '####'
        k=cfg.cot_samples,
        keep_per_question=1,
        rationalization_attempts=0,  # a tiny teacher cannot use a hint; questions it cannot solve are dropped
        seed=cfg.seed,
        # The teacher was trained on bare questions: no instruction, no shots, the question as the whole prompt.
        prompt=PromptConfig(instruction="", shots=[], template="{question}"),
        teacher=TeacherConfig(
            backend="local",
            model=str(teacher),
            api_key_env=None,
            batch_size=128,
            decoding=DecodingConfig(temperature=cfg.cot_temperature, max_tokens=cfg.max_new_tokens),
        ),
        output=OutputConfig(dir=str(out), formats=["jsonl"], progress=False),
    )
    result = cot_command.run(cot)
    if result.stopped:
        raise Stopped(result.stopped)  # interrupted: the journal keeps what was done, a rerun continues
    return _check_rationales(cfg, out)


def _check_rationales(cfg: QuickstartConfig, out: Path) -> Path:
    if json.loads((out / "stats.json").read_text())["rows"] == 0:
        raise ConfigError(
            f"teacher_steps: the teacher solved none of the {cfg.num_train} training questions, so there "
            f"are no rationales to train on; train it longer (rerun with --overwrite)"
        )
    return out / "data.jsonl"


def make_student_init(cfg: QuickstartConfig, teacher: Path, data: Path, out: Path) -> Path:
    """``distill prune``: keep ``student_layers`` by Block Influence and the most active MLP channels."""
    from distill.student.prune import command as prune
    from distill.student.prune.command import CalibrationSettings, DepthSettings, WidthSettings

    if (out / "prune_report.json").exists():
        return out
    prune.run(
        prune.Config(
            model=str(teacher),
            output_dir=str(out),
            depth=DepthSettings(num_layers=cfg.student_layers),
            width=WidthSettings(intermediate_size=cfg.student_intermediate_size),  # None keeps the teacher's
            calibration=CalibrationSettings(data=str(data / "train.jsonl"), num_samples=64),
            cache_dir=str(out.parent / "prune_cache"),
        )
    )  # writes into a temporary sibling and renames: done or absent, never half-written
    return out


def evaluate_stage(model: Path, data: Path, teacher: Path, out: Path, cfg: QuickstartConfig) -> dict[str, Any]:
    from distill.evaluation import command as evaluation

    if out.exists():
        return json.loads(out.read_text())
    result = evaluation.run(
        evaluation.Config(
            model=str(model),
            data=str(data / "eval.jsonl"),
            teacher=str(teacher),
            max_new_tokens=cfg.max_new_tokens,
            batch_size=64,
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    return result


# ------------------------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QuickstartResult:
    """What :func:`run` returns."""

    output_dir: Path
    report: dict[str, Any] | None  # the content of report.json; None when a stage stopped early
    stopped: str | None = None  # why a stage stopped early (cot: 'budget', 'interrupted'; training: 'preempted')


def run(cfg: QuickstartConfig) -> QuickstartResult:
    """Every stage of the module docstring (skipping finished ones, resuming an interrupted one) and the report."""
    try:
        return QuickstartResult(Path(cfg.output_dir), run_stages(cfg))
    except Stopped as stop:  # everything done is saved; rerunning the same command continues the stage
        return QuickstartResult(Path(cfg.output_dir), None, stop.reason)


def run_stages(cfg: QuickstartConfig) -> dict[str, Any]:
    with prepare_output_dir(cfg) as output:
        return _stages(cfg, output.path)


def _stages(cfg: QuickstartConfig, root: Path) -> dict[str, Any]:
    from kd_recipes.report import MODELS, write_report

    print(f"quickstart: writing to {root.resolve()}")
    timings = json.loads((root / "timings.json").read_text()) if (root / "timings.json").exists() else {}

    def timed(name: str, fn, *args, **kwargs):
        began = time.time()
        try:
            return fn(*args, **kwargs)
        finally:  # an interrupted stage's time counts too: the figures are summed over resumed runs
            timings[name] = timings.get(name, 0.0) + time.time() - began
            atomic_write_json(root / "timings.json", timings)

    data = root / "data"
    held_out = data / "eval.jsonl"
    print("quickstart: [1/8] problems")
    problems = timed("data", make_data, cfg, data)
    print("quickstart: [2/8] tokenizer and teacher (CE on gold rationales)")
    timed("teacher_init", make_teacher_init, cfg, problems, root / "teacher_init")
    teacher = timed(
        "teacher",
        train_stage,
        cfg,
        root / "teacher",
        train_file=data / "train.jsonl",
        eval_file=held_out,
        student=root / "teacher_init",
        terms={"ce": 1.0},
        steps=cfg.teacher_steps,
        lora=False,
    )
    print("quickstart: [3/8] teacher rationales (data-gen cot, local backend)")
    rationales = timed("cot", make_rationales, cfg, teacher, data, root / "cot")
    print("quickstart: [4/8] pruning the teacher into the student (distill prune)")
    student_init = timed("prune", make_student_init, cfg, teacher, data, root / "student_init")
    students = root / "students"
    print("quickstart: [5/8] student on gold answers only")
    timed(
        "labels",
        train_stage,
        cfg,
        students / "labels",
        train_file=data / "train_labels.jsonl",
        eval_file=held_out,
        student=student_init,
        terms={"ce": 1.0},
        steps=cfg.student_steps,
        lora=True,
    )
    print("quickstart: [6/8] student on teacher rationales, then distilled on them")
    cot_stats = json.loads((root / "cot" / "stats.json").read_text())
    batch = min(cfg.batch_size, cot_stats["rows"])  # a weak teacher may keep fewer rationales than one batch
    timed(
        "rationales",
        train_stage,
        cfg,
        students / "rationales",
        train_file=rationales,
        eval_file=held_out,
        student=student_init,
        terms={"ce": 1.0},
        steps=cfg.student_steps,
        lora=True,
        batch_size=batch,
    )
    timed(
        "distilled",
        train_stage,
        cfg,
        students / "distilled",
        train_file=rationales,
        eval_file=held_out,
        student=student_init,
        teacher=teacher,
        terms=cfg.loss_terms,
        steps=cfg.student_steps,
        lora=True,
        batch_size=batch,
    )
    print("quickstart: [7/8] the rationale student continued on-policy (it samples, the teacher scores)")
    # Every batch is sampled from the training questions (the gold rationales serve only the batches that
    # on_policy.student_fraction < 1 leaves off-policy), so the teacher's unsolved questions are used too.
    timed(
        "on_policy",
        train_stage,
        cfg,
        students / "on_policy",
        train_file=data / "train.jsonl",
        eval_file=held_out,
        student=students / "rationales" / "final",
        teacher=teacher,
        terms=cfg.on_policy.terms,
        steps=cfg.on_policy.steps,
        lora=True,
        on_policy=cfg.on_policy.settings(),
        learning_rate=cfg.on_policy.learning_rate,
    )
    print("quickstart: [8/8] evaluating and writing the report")
    results = {
        name: timed(f"eval_{name}", evaluate_stage, root / path, data, teacher, root / "eval" / f"{name}.json", cfg)
        for name, path, _ in MODELS
    }
    report = write_report(root, cfg, results, cot_stats, timings)
    return report


Config = QuickstartConfig


def main(argv: list[str]) -> int:
    from distill.training.train import setup_logging

    setup_logging()
    cfg = parse_command_line(QuickstartConfig, argv, "distill quickstart", __doc__ or "")
    return stop_code(run(cfg).stopped)
