"""Benchmark: what a served teacher costs per on-policy step, against the same teacher run in the trainer.

    python bench/served_on_policy.py --teacher DIR --url http://127.0.0.1:8000/v1 --served_model NAME

``--teacher`` is a local model directory and ``--url`` a vLLM serving the same weights (``--served_model``: its
name). Both sides train the same tiny student (2 layers, 64 wide, the teacher's tokenizer; or ``--student``) on the
same prompts (GSM8K questions from ../shared/data when present, else synthetic word problems), every micro-batch
sampled by the student (up to ``--max_new_tokens`` tokens), loss reverse KL: the local side runs the teacher in the
step and the full-vocabulary kernel, the served side sends each row's ids to the server (``loss.served_topk`` = ``--k``
log-probs) and runs the top-k plus tail kernel. One trainer per side for the whole run; each round runs ``--steps``
steps of one side, then of the other (the order alternates), after one warm-up step each. Printed per side: median
seconds per step, of it sampling and (served) waiting for the server, and the ratio served / local.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def prompts_file(root: Path, count: int) -> Path:
    gsm8k = SHARED / "gsm8k_train.jsonl"
    if gsm8k.is_file():
        questions = [json.loads(line)["question"] for line in gsm8k.read_text().splitlines()[:count]]
    else:
        from distill.data.synthetic import make_problems

        questions = [p["question"] for p in make_problems(count, seed=0)]
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return path


def tiny_student(root: Path, teacher: str) -> Path:
    from distill.student.tiny import tiny_llama
    from kd_core.pretrained import load_tokenizer

    tokenizer = load_tokenizer(teacher, "--teacher")
    path = root / "student"
    tiny_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trainer(args, root: Path, name: str, model: dict, data: Path):
    from distill.training.train import Distiller, TrainConfig
    from kd_core.config import from_dict

    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(root / name),
            "max_steps": 10_000,
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": 1e-4,
            "save_steps": 10_000,
            "eval_steps": None,
            "logging_steps": 1,
            "report_to": ["none"],
            "model": model,
            "data": {"train_file": str(data), "eval_fraction": 0.0, "max_length": 512},
            "loss": {"terms": {"reverse_kl": 1.0}, "served_topk": args.k},
            "on_policy": {"student_fraction": 1.0, "max_new_tokens": args.max_new_tokens},
        },
    )
    distiller = Distiller(cfg)
    distiller.start()
    distiller.guarded_step()  # warm-up
    return distiller


def timed(distiller, steps: int) -> list[dict[str, float]]:
    rows = []
    for _ in range(steps):
        began = time.perf_counter()
        values = distiller.guarded_step()
        values["step_seconds"] = time.perf_counter() - began
        rows.append(values)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="local model directory (the weights the server serves)")
    parser.add_argument("--url", required=True, help="the server's OpenAI base URL, .../v1")
    parser.add_argument("--served_model", required=True, help="the model name the server serves")
    parser.add_argument("--student", default=None, help="student directory (default: a tiny one built here)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prompts_file(root, 64)
        student = args.student or str(tiny_student(root, args.teacher))
        served_model = {"student": student, "teacher_url": args.url, "teacher_model": args.served_model}
        sides = {
            "local": trainer(args, root, "local", {"student": student, "teacher": args.teacher}, data),
            "served": trainer(args, root, "served", served_model, data),
        }
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for name in order:
                figures[name] += timed(sides[name], args.steps)
    medians = {}
    for name, rows in figures.items():
        keys = ("step_seconds", "on_policy/sample_seconds", "served/wait_seconds", "on_policy/sampled_length")
        medians[name] = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
        m = medians[name]
        print(
            f"{name:>6}: {m['step_seconds']:.3f} s/step (sampling {m['on_policy/sample_seconds']:.3f} s, waiting for "
            f"the server {m['served/wait_seconds']:.3f} s), {m['on_policy/sampled_length']:.1f} sampled tokens/row, "
            f"{len(rows)} steps"
        )
    print(f"served / local: {medians['served']['step_seconds'] / medians['local']['step_seconds']:.2f}")


if __name__ == "__main__":
    main()
