"""The stages of ``distill quickstart`` (see :mod:`kd_recipes.quickstart`), one function each: every one writes
its own folder, is skipped when that folder holds a finished stage and otherwise continues an interrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from distill.losses.objective import LossSettings
from distill.training.on_policy import OnPolicySettings
from kd_core.atomic import atomic_directory, atomic_write_json, atomic_write_text
from kd_core.commands import Stopped
from kd_core.config import ConfigError
from kd_recipes.quickstart_config import QuickstartConfig


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
    max_length: int = 128,
    eval_steps: int | None = None,
    eval_batch_size: int = 64,
) -> Path:
    """``distill train`` in-process, resumable; skipped when the stage already finished. Returns ``final/``.
    ``batch_size`` (default ``cfg.batch_size``) is smaller only when the teacher kept fewer rationales than that;
    ``on_policy`` makes the student (or teacher) sample the completions; ``learning_rate`` defaults to
    ``cfg.learning_rate``; ``eval_steps`` to a quarter of ``steps``. A ``teacher`` with ``ce`` alone serves the eval."""
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
        max_length=max_length,
        # Packed rows (no padding) wherever the terms allow: same loss, fewer tokens run.
        packing=not loss.feature_terms,
        resume="auto",  # a rerun after an interruption continues the stage from its last checkpoint
        max_steps=steps,
        per_device_train_batch_size=batch_size or cfg.batch_size,
        per_device_eval_batch_size=eval_batch_size,
        learning_rate=learning_rate or cfg.learning_rate,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        save_steps=max(1, steps // 4),
        save_total_limit=1,
        eval_steps=eval_steps or max(1, steps // 4),
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
