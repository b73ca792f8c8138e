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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kd_core import ownership
from kd_core.atomic import atomic_write_json
from kd_core.commands import Stopped, stop_code
from kd_core.config import parse_command_line, save_config, to_dict
from kd_recipes.quickstart_config import OnPolicyStudent as OnPolicyStudent  # re-exported: its old import path
from kd_recipes.quickstart_config import QuickstartConfig
from kd_recipes.quickstart_stages import (
    evaluate_stage,
    make_data,
    make_rationales,
    make_student_init,
    make_teacher_init,
    train_stage,
)

# The settings live in kd_recipes.quickstart_config and each stage's function in kd_recipes.quickstart_stages;
# this module owns the output directory and runs the stages in order. (The docstring above is the --help text.)
REPORT = "report.json"
CONFIG = "config.yaml"


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
        "teacher_corrected",
        "answers",
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
    defaults = ownership.defaults_of(QuickstartConfig)  # a field added since a run began, at its default: no change

    def resumable(owner: ownership.Owner) -> str | None:
        if (root / REPORT).exists():
            return "holds a finished quickstart"
        if not (root / CONFIG).is_file():
            return "holds an unfinished quickstart without its config.yaml"
        changed = ownership.changed(_saved(root), _comparable(cfg), defaults)
        return f"holds an unfinished quickstart with other settings ({', '.join(changed)})" if changed else None

    output = ownership.prepare(
        root,
        OUTPUT,
        _comparable(cfg),
        resume=True,
        overwrite=cfg.overwrite,
        check=resumable,
        remedy="pass --overwrite to replace it, or another --output_dir",
        defaults=defaults,
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
    if cfg.real.enabled:
        from kd_recipes.quickstart_real_stages import check_shipped_sizes, teacher_source

        teacher_source(cfg)  # a missing model package or teacher file is refused before anything is written
        check_shipped_sizes(cfg)
    try:
        return QuickstartResult(Path(cfg.output_dir), run_stages(cfg))
    except Stopped as stop:  # everything done is saved; rerunning the same command continues the stage
        return QuickstartResult(Path(cfg.output_dir), None, stop.reason)


def run_stages(cfg: QuickstartConfig) -> dict[str, Any]:
    with prepare_output_dir(cfg) as output:
        return _stages(cfg, output.path)


def _stages(cfg: QuickstartConfig, root: Path) -> dict[str, Any]:
    from kd_recipes.report import write_report

    print(f"quickstart: writing to {root.resolve()}")
    timings = json.loads((root / "timings.json").read_text()) if (root / "timings.json").exists() else {}
    timed = _timer(root, timings)
    if cfg.real.enabled:
        from kd_recipes.quickstart_real import stages

        return stages(cfg, root, timed, timings)
    data = root / "data"
    teacher = _teacher(cfg, root, timed)
    print("quickstart: [3/8] teacher rationales (data-gen cot, local backend)")
    rationales = timed("cot", make_rationales, cfg, teacher, data, root / "cot")
    print("quickstart: [4/8] pruning the teacher into the student (distill prune)")
    student_init = timed("prune", make_student_init, cfg, teacher, data, root / "student_init")
    cot_stats = _text_students(cfg, root, timed, teacher, rationales, student_init)
    _on_policy_student(cfg, root, timed, teacher)
    print("quickstart: [8/8] evaluating and writing the report")
    results = _evaluations(cfg, root, timed, teacher)
    report = write_report(root, cfg, results, cot_stats, timings)
    return report


def _timer(root: Path, timings: dict[str, float]) -> Callable[..., Any]:
    """``timed(name, fn, *args, **kwargs)``: runs one stage and adds its seconds to ``timings`` and timings.json."""

    def timed(name: str, fn, *args, **kwargs):
        began = time.time()
        try:
            return fn(*args, **kwargs)
        finally:  # an interrupted stage's time counts too: the figures are summed over resumed runs
            timings[name] = timings.get(name, 0.0) + time.time() - began
            atomic_write_json(root / "timings.json", timings)

    return timed


def _teacher(cfg: QuickstartConfig, root: Path, timed: Callable[..., Any]) -> Path:
    """Stages 1 and 2: the problems, then the tokenizer and the teacher trained on them; returns the teacher."""
    data = root / "data"
    print("quickstart: [1/8] problems")
    problems = timed("data", make_data, cfg, data)
    print("quickstart: [2/8] tokenizer and teacher (CE on gold rationales)")
    timed("teacher_init", make_teacher_init, cfg, problems, root / "teacher_init")
    return timed(
        "teacher",
        train_stage,
        cfg,
        root / "teacher",
        train_file=data / "train.jsonl",
        eval_file=data / "eval.jsonl",
        student=root / "teacher_init",
        terms={"ce": 1.0},
        steps=cfg.teacher_steps,
        lora=False,
    )


def _text_students(
    cfg: QuickstartConfig, root: Path, timed: Callable[..., Any], teacher: Path, rationales: Path, student_init: Path
) -> dict[str, Any]:
    """Stages 5 and 6: the pruned student trained on gold answers, on the teacher's rationales, and distilled on
    them; returns the ``data-gen cot`` statistics (for the report)."""
    data = root / "data"
    held_out = data / "eval.jsonl"
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
    return cot_stats


def _on_policy_student(cfg: QuickstartConfig, root: Path, timed: Callable[..., Any], teacher: Path) -> None:
    """Stage 7: the rationale student continued on its own samples, scored token by token by the teacher."""
    data = root / "data"
    students = root / "students"
    print("quickstart: [7/8] the rationale student continued on-policy (it samples, the teacher scores)")
    # Every batch is sampled from the training questions (the gold rationales serve only the batches that
    # on_policy.student_fraction < 1 leaves off-policy), so the teacher's unsolved questions are used too.
    timed(
        "on_policy",
        train_stage,
        cfg,
        students / "on_policy",
        train_file=data / "train.jsonl",
        eval_file=data / "eval.jsonl",
        student=students / "rationales" / "final",
        teacher=teacher,
        terms=cfg.on_policy.terms,
        steps=cfg.on_policy.steps,
        lora=True,
        on_policy=cfg.on_policy.settings(),
        learning_rate=cfg.on_policy.learning_rate,
    )


def _evaluations(cfg: QuickstartConfig, root: Path, timed: Callable[..., Any], teacher: Path) -> dict[str, Any]:
    """Stage 8's figures: ``distill eval`` of every compared model on the held-out problems, by model name."""
    from kd_recipes.report import MODELS

    data = root / "data"
    return {
        name: timed(f"eval_{name}", evaluate_stage, root / path, data, teacher, root / "eval" / f"{name}.json", cfg)
        for name, path, _ in MODELS
    }


Config = QuickstartConfig


def main(argv: list[str]) -> int:
    from distill.training.train import setup_logging

    setup_logging()
    cfg = parse_command_line(QuickstartConfig, argv, "distill quickstart", __doc__ or "")
    return stop_code(run(cfg).stopped)
