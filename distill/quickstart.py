"""``distill quickstart``: the whole idea on a laptop CPU in a few minutes, with nothing downloaded.

Stages (each resumable: an interrupted run continues the stage it was in):

1. ``data/``: arithmetic word problems with worked answers, generated from the seed (``distill.synthetic``).
2. ``teacher/``: a byte-level BPE tokenizer trained on them and a small Llama trained on the answers (plain CE).
3. ``student_init/``: a narrower, shallower Llama with the same tokenizer, randomly initialised.
4. ``distill/``: the student distilled from the teacher (logit KD plus a little CE) with ``distill train``'s loop.
5. ``report.json`` / ``report.md``: held-out KL to the teacher, top-1 agreement and the student's loss, before and
   after distillation.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from distill.configuration import ConfigError, option, parse_command_line, save_config
from distill.data import DataSettings
from distill.models import ModelSettings
from distill.objective import LossSettings

REPORT = "report.json"


@dataclasses.dataclass
class QuickstartConfig:
    output_dir: str = option("runs/quickstart", help="Directory for every stage's outputs and the report.")
    overwrite: bool = option(False, help="Replace a finished quickstart in output_dir instead of refusing.")
    seed: int = option(0, help="Seed for the problems, the models and the data order.")
    num_train: int = option(3000, help="Training problems.")
    num_eval: int = option(200, help="Held-out problems for the before/after figures.")
    vocab_size: int = option(384, help="Size of the BPE tokenizer trained on the problems.")
    teacher_layers: int = option(4, help="Teacher depth.")
    teacher_hidden: int = option(128, help="Teacher width.")
    student_layers: int = option(2, help="Student depth.")
    student_hidden: int = option(64, help="Student width.")
    teacher_steps: int = option(400, help="Optimizer steps to train the teacher on the answers.")
    distill_steps: int = option(300, help="Optimizer steps to distil the student.")
    batch_size: int = option(32, help="Sequences per step.")
    learning_rate: float = option(3e-3, help="Peak learning rate for both trainings (tiny models like it high).")
    loss_terms: dict[str, float] = option(
        {"forward_kl": 0.9, "ce": 0.1}, help="Distillation loss terms and weights (see `distill train --help`)."
    )

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "teacher_steps", "distill_steps", "batch_size", "teacher_layers",
                     "student_layers", "teacher_hidden", "student_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_train < self.batch_size:
            raise ValueError(f"num_train: expected at least batch_size ({self.batch_size}), got {self.num_train}")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def _train_config(cfg: QuickstartConfig, out: Path, model: ModelSettings, terms: dict[str, float], steps: int):
    from distill.train import TrainConfig

    return TrainConfig(
        output_dir=str(out),
        resume="auto",  # a rerun after an interruption continues the stage
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=cfg.learning_rate,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        save_steps=max(1, steps // 4),
        save_total_limit=1,
        eval_steps=max(1, steps // 4),
        logging_steps=max(1, steps // 20),
        seed=cfg.seed,
        report_to=["tensorboard"],
        model=model,
        data=DataSettings(train_file=str(out.parent / "data" / "train.jsonl"),
                          eval_file=str(out.parent / "data" / "eval.jsonl"), max_length=128),
        loss=LossSettings(terms=terms),
    )


def _run_stage(train_cfg) -> Path:
    """Trains unless the stage already finished; returns the exported model directory."""
    from distill.train import Distiller

    final = Path(train_cfg.output_dir) / "final"
    if not (Path(train_cfg.output_dir) / "summary.json").exists():
        Distiller(train_cfg).train()
    return final


def _evaluate(student_dir: Path, teacher_dir: Path, eval_file: Path) -> dict[str, float]:
    from distill.evaluation import evaluate_model_dirs

    return evaluate_model_dirs(student_dir, teacher_dir, eval_file, max_length=128)


def run(cfg: QuickstartConfig) -> dict:
    from distill.synthetic import corpus_for_tokenizer, make_problems
    from distill.tiny import tiny_llama, train_tokenizer

    root = Path(cfg.output_dir)
    if (root / REPORT).exists():
        if not cfg.overwrite:
            raise ConfigError(f"output_dir: {root} holds a finished quickstart; pass --overwrite or another --output_dir")
        shutil.rmtree(root)
    print(f"quickstart: writing to {root.resolve()}")
    save_config(cfg, root / "config.yaml")

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    problems = make_problems(cfg.num_train + cfg.num_eval, cfg.seed)
    if not (data / "eval.jsonl").exists():
        _write_jsonl(data / "train.jsonl", problems[: cfg.num_train])
        _write_jsonl(data / "eval.jsonl", problems[cfg.num_train :])

    teacher_init, student_init = root / "teacher_init", root / "student_init"
    if not (student_init / "config.json").exists():
        tokenizer = train_tokenizer(corpus_for_tokenizer(problems), vocab_size=cfg.vocab_size)
        for path, layers, hidden in ((teacher_init, cfg.teacher_layers, cfg.teacher_hidden),
                                     (student_init, cfg.student_layers, cfg.student_hidden)):
            model = tiny_llama(len(tokenizer), hidden_size=hidden, num_layers=layers,
                               num_heads=max(1, hidden // 32), seed=cfg.seed + layers)
            tokenizer.save_pretrained(path)
            model.save_pretrained(path)  # config.json last-but-one; the check above looks for it

    print("quickstart: [1/3] training the teacher on worked answers")
    teacher = _run_stage(_train_config(cfg, root / "teacher", ModelSettings(student=str(teacher_init)),
                                       {"ce": 1.0}, cfg.teacher_steps))
    before = _evaluate(student_init, teacher, data / "eval.jsonl")
    print("quickstart: [2/3] distilling the student")
    student = _run_stage(_train_config(
        cfg, root / "distill", ModelSettings(teacher=str(teacher), student=str(student_init)),
        cfg.loss_terms, cfg.distill_steps))
    print("quickstart: [3/3] evaluating")
    after = _evaluate(student, teacher, data / "eval.jsonl")
    teacher_alone = _evaluate(teacher, teacher, data / "eval.jsonl")
    report = {
        "before": before,
        "after": after,
        "teacher_loss": teacher_alone["loss"],
        "teacher_dir": str(teacher),
        "student_dir": str(student),
        "parameters": {"teacher": before["teacher_parameters"], "student": before["student_parameters"]},
    }
    (root / "report.md").write_text(render_report(report))
    (root / REPORT).write_text(json.dumps(report, indent=1))
    print(render_report(report))
    return report


def render_report(report: dict) -> str:
    before, after = report["before"], report["after"]
    rows = [
        ("KL(teacher || student), nats/token", before["kl"], after["kl"]),
        ("top-1 agreement with teacher", before["top1_agreement"], after["top1_agreement"]),
        ("student loss (CE on answers)", before["loss"], after["loss"]),
    ]
    lines = [
        "# Quickstart report",
        "",
        f"Teacher: {report['parameters']['teacher']:,} parameters (its own loss {report['teacher_loss']:.3f}); "
        f"student: {report['parameters']['student']:,} parameters. Held-out problems, completion tokens only.",
        "",
        "| metric | before distillation | after distillation |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {b:.4f} | {a:.4f} |" for name, b, a in rows]
    return "\n".join(lines) + "\n"


CONFIG_CLASS = QuickstartConfig  # read by tests that load every shipped config


def main(argv: list[str]) -> int:
    from distill.train import setup_logging

    setup_logging()
    cfg = parse_command_line(QuickstartConfig, argv, "distill quickstart", __doc__)
    run(cfg)
    return 0
