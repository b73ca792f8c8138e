"""Parts of ``bench/recovery.py``: the held-out general-instruction set answered by the original teacher, the
general rows some runs train on, and the training worker that evaluates each run against that teacher every
``eval_steps`` (the recovery curves).

The trainer's own periodic eval compares the student with the teacher it learns from; for the corrected-teacher
recipe that is not the original model, and the CE student keeps no teacher at all. The worker therefore wraps the
run (:class:`RecoveryDistiller`, the loop's documented hook: benchmarks wrap its methods): at every evaluation it
measures the student against the original teacher on every held-out set with ``distill eval``'s own token figures
(:func:`distill.evaluation.command.token_figures`: chunked, never ``[tokens, vocab]``), and counts the training
tokens seen so far (non-padding input tokens of every micro-batch), so the curves can be drawn against tokens.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

INSTRUCTIONS = "self_instruct_user_oriented_instructions.jsonl"


def first_instance(row: dict) -> dict:
    """A Self-Instruct task's first instance (input/output), or an empty one when it lists none."""
    return (row.get("instances") or [{}])[0]


def instruction_prompt(row: dict) -> str:
    """The user turn of a Self-Instruct user-oriented task: its instruction, then its first instance's input."""
    given = (first_instance(row).get("input") or "").strip()
    return row["instruction"].strip() + (f"\n\n{given}" if given else "")


def general_set(teacher_dir: Path, data: Path, out: Path, records: int, max_new_tokens: int) -> Path:
    """``records`` held-out general instructions (Self-Instruct's user-oriented set, which no stage trains on) with
    the original teacher's own greedy answers as completions, written once to ``out`` as prompt/completion rows.
    KL of a student to the teacher on these answers measures how much of the teacher's general behaviour it kept."""
    if out.is_file():
        return out
    from kd_core.atomic import atomic_write_text

    rows = [json.loads(line) for line in (data / INSTRUCTIONS).read_text().splitlines()[:records]]
    prompts = [instruction_prompt(r) for r in rows]
    answers = teacher_answers(teacher_dir, prompts, max_new_tokens)
    lines = [json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in zip(prompts, answers) if a]
    atomic_write_text(out, "".join(lines))
    return out


def teacher_answers(teacher_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The teacher's greedy answer to each prompt (chat template, the product's one generation routine); an empty
    string where it stopped at once."""
    from kd_core.generation import encode_prompt, generate_batched
    from kd_core.pretrained import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(teacher_dir, "teacher")
    teacher = load_causal_lm(teacher_dir, "teacher").eval()
    answers, _ = generate_batched(
        teacher, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens, batch_size=8
    )
    return [a.text for a in answers]


SEED_TASKS = "self_instruct_seed_tasks.jsonl"


def general_train_rows(data: Path, count: int, held_out: int) -> list[dict]:
    """``count`` general-instruction rows with their human-written outputs (prompt/completion), for training: the
    175 Self-Instruct seed tasks first, then the user-oriented instructions after the first ``held_out`` (the
    general eval set of :func:`general_set`, which therefore stays unseen). Never the teacher's text, so CE and
    distillation train on the same rows and differ only in their targets."""
    rows = [json.loads(line) for line in (data / SEED_TASKS).read_text().splitlines()]
    rows += [json.loads(line) for line in (data / INSTRUCTIONS).read_text().splitlines()[held_out:]]
    pairs = [(instruction_prompt(r), (first_instance(r).get("output") or "").strip()) for r in rows]
    pairs = [(prompt, answer) for prompt, answer in pairs if answer]
    if len(pairs) < count:
        raise SystemExit(f"--general_train: {count} rows asked, {len(pairs)} general rows with an output exist")
    return [{"prompt": prompt, "completion": answer} for prompt, answer in pairs[:count]]


def with_teacher_text(rows: list[dict], teacher_dir: Path, max_new_tokens: int) -> list[dict]:
    """``rows`` with each completion replaced by the teacher's own greedy answer to its prompt (sequence-level KD,
    what ``data-gen`` makes from a teacher), the human-written one kept where the teacher answered nothing."""
    answers = teacher_answers(teacher_dir, [r["prompt"] for r in rows], max_new_tokens)
    return [{**row, "completion": answer or row["completion"]} for row, answer in zip(rows, answers)]


def recovery_distiller(spec: dict):
    """A :class:`~distill.training.loop.Distiller` whose evaluations add, for each held-out set of ``spec["sets"]``
    (name -> prompt/completion file), the student's perplexity, KL, top-1 agreement and draft alpha against the
    original teacher ``spec["teacher"]``, and ``tokens_seen``."""
    from distill.evaluation.command import EvalConfig, load_model, token_figures
    from distill.runtime import inner
    from distill.training.loop import Distiller
    from kd_core.records import load_records

    class RecoveryDistiller(Distiller):
        def __init__(self, cfg, output_dir) -> None:
            super().__init__(cfg, output_dir)
            self.reference = load_model(spec["teacher"], "cpu", "teacher")
            self.sets = {
                name: (
                    EvalConfig(model=spec["teacher"], data=path, max_length=spec["max_length"], batch_size=8),
                    load_records(path, "data"),
                )
                for name, path in spec["sets"].items()
            }
            self.tokens_seen = 0

        def next_micro_batches(self):
            batches, *rest = super().next_micro_batches()
            self.tokens_seen += sum(int(b["attention_mask"].sum()) for b in batches)
            return (batches, *rest)

        def evaluate(self) -> dict[str, float]:
            figures = dict(super().evaluate())
            student = inner(self.module).student
            student.eval()
            try:
                for name, (cfg, records) in self.sets.items():
                    found = token_figures(cfg, records, student, self.tokenizer, self.reference)
                    for key in ("perplexity", "kl", "top1_agreement", "alpha"):
                        if found.get(key) is not None:
                            figures[f"eval/{name}_{key}"] = found[key]
            finally:
                student.train()
            figures["tokens_seen"] = self.tokens_seen
            return figures

    return RecoveryDistiller


def train_worker(argv: list[str], result: Path, spec_file: Path) -> None:
    """``distill train`` in this process with :func:`recovery_distiller`'s evaluations; the mean seconds per
    training step (eval excluded: the loop's own ``step_seconds``), the wall seconds and this process's peak RSS go
    to ``result``."""
    import distill.training.train as train

    train.Distiller = recovery_distiller(json.loads(spec_file.read_text()))
    train.main(argv)
    out = Path(argv[argv.index("--output_dir") + 1])
    summary = json.loads((out / "summary.json").read_text())
    steps = [r["train/step_seconds"] for r in summary["history"] if "train/step_seconds" in r]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    result.write_text(
        json.dumps(
            {
                "seconds_per_step": sum(steps) / len(steps),
                "wall_seconds_per_step": summary["train_seconds"] / summary["steps"],
                "peak_rss_gib": peak,
            }
        )
    )
