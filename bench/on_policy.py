"""Benchmark: an on-policy distillation step (the student samples, the teacher scores) against trl's GKDTrainer at
lmbda 1, on the same models, prompts and settings, in one process, interleaved round by round.

    python bench/on_policy.py                                   # tiny quickstart-sized pair, built here
    python bench/on_policy.py --teacher T --student S           # any pair of local model directories (or .gguf)

Both sides: batch ``--batch_size`` prompts (GSM8K questions from ../shared/data when present, else the synthetic
word problems), every micro-batch sampled by the student (``on_policy.student_fraction 1`` / ``lmbda 1``) at
temperature 1 with no top-k/top-p cut and up to ``--max_new_tokens`` tokens, then the generalized JSD (beta 0.5)
against the teacher on the sampled tokens, AdamW, one process on the CPU. Each round runs ``--steps`` steps of
ours (one trainer for the whole run) and then ``--steps`` steps of a fresh GKDTrainer (its first step, which builds
the optimizer and warms up, is not counted; ours are all after a warm-up step). Printed: median seconds per step, the
share of it spent sampling (ours), sampled tokens per second of step time, and the ratio ours / trl.
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
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def questions(count: int) -> list[str]:
    gsm8k = SHARED / "gsm8k" / "train.jsonl"
    if gsm8k.is_file():
        rows = [json.loads(line) for line in gsm8k.read_text().splitlines()[:count]]
        return [r["question"] for r in rows]
    from distill.data.synthetic import make_problems

    return [p["question"] for p in make_problems(count, seed=0)]


def tiny_pair(root: Path, texts: list[str]) -> tuple[Path, Path]:
    """The quickstart's shapes: a 4-layer, 128-wide teacher and a 2-layer, 64-wide student, one BPE tokenizer."""
    from distill.student.tiny import tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=384)
    paths = []
    for name, layers, hidden in (("teacher", 4, 128), ("student", 2, 64)):
        path = root / name
        tiny_llama(
            len(tokenizer), hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 32), seed=layers
        ).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def ours(args, teacher: Path, student: Path, data: Path, out: Path):
    from distill.training.train import Distiller, TrainConfig
    from kd_core.config import from_dict

    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(out),
            "max_steps": 10_000,
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "constant",
            "report_to": ["none"],
            "eval_steps": None,
            "logging_steps": 1,
            "model": {"teacher": str(teacher), "student": str(student)},
            "data": {"train_file": str(data), "eval_fraction": 0.0, "max_length": args.max_length},
            "loss": {"terms": {"jsd": 1.0}, "beta": 0.5},
            "on_policy": {"student_fraction": 1.0, "max_new_tokens": args.max_new_tokens, "temperature": 1.0},
        },
    )
    distiller = Distiller(cfg)
    distiller.module.train()
    distiller.training_step()  # warm-up

    def steps(n: int) -> list[tuple[float, float, int]]:
        timed = []
        for _ in range(n):
            tokens_before = distiller.sampler.counts["generated_tokens"]
            began = time.perf_counter()
            values = distiller.training_step()
            timed.append(
                (
                    time.perf_counter() - began,
                    values["on_policy/sample_seconds"],
                    distiller.sampler.counts["generated_tokens"] - tokens_before,
                )
            )
        return timed

    return steps


def trl_steps(args, teacher: Path, student: Path, data: Path, out: Path, n: int) -> list[tuple[float, float, int]]:
    """``n`` counted steps of a fresh GKDTrainer (trl 1.16, trl.experimental.gkd), lmbda 1."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    generated = [0]
    original = GKDTrainer.generate_on_policy_outputs

    def counting(model, inputs, generation_config):  # sampled tokens = the labels it keeps
        ids, mask, labels = original(model, inputs, generation_config)
        generated[0] += int((labels != -100).sum())
        return ids, mask, labels

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.began, self.at = [], [], 0.0, 0

        def on_step_begin(self, *_args, **_kwargs):
            self.began, self.at = time.perf_counter(), generated[0]

        def on_step_end(self, *_args, **_kwargs):
            self.times.append(time.perf_counter() - self.began)
            self.tokens.append(generated[0] - self.at)

    timer = StepTimer()
    tokenizer = AutoTokenizer.from_pretrained(student)
    config = GKDConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_steps=n + 1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        lmbda=1.0,
        beta=0.5,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        bf16=False,  # fp32 like ours (transformers 5.24's TrainingArguments turns bf16 on by default where supported)
    )
    GKDTrainer.generate_on_policy_outputs = staticmethod(counting)
    try:
        trainer = GKDTrainer(
            model=AutoModelForCausalLM.from_pretrained(student),
            teacher_model=AutoModelForCausalLM.from_pretrained(teacher),
            args=config,
            train_dataset=load_dataset("json", data_files=str(data), split="train"),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    finally:
        GKDTrainer.generate_on_policy_outputs = staticmethod(original)
    return [(t, float("nan"), k) for t, k in zip(timer.times[1:], timer.tokens[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, help="Teacher directory or .gguf (default: a tiny pair built here).")
    parser.add_argument("--student", type=Path)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="Counted steps per side per round.")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = questions(256)
        teacher, student = (args.teacher, args.student) if args.teacher else tiny_pair(root, texts)
        data = root / "prompts.jsonl"  # `messages` with a final assistant turn: GKD's collator needs one to cut
        data.write_text(
            "".join(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "-"}]}) + "\n"
                for q in texts
            )
        )
        ours_steps = ours(args, teacher, student, data, root / "ours")
        results = {"ours": [], "trl": []}
        for round_index in range(args.rounds):
            results["ours"] += ours_steps(args.steps)
            results["trl"] += trl_steps(args, teacher, student, data, root / f"trl{round_index}", args.steps)
    import transformers
    import trl

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
        f"batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, {args.rounds} rounds x {args.steps} steps"
    )
    print("| trainer | s/step (median) | sampling share | sampled tokens/s of step time |")
    print("|---|---|---|---|")
    medians = {}
    for name, rows in results.items():
        medians[name] = statistics.median(t for t, _, _ in rows)
        share = statistics.median(s / t for t, s, _ in rows) if name == "ours" else float("nan")
        rate = sum(k for _, _, k in rows) / sum(t for t, _, _ in rows)
        share_text = f"{share:.0%}" if share == share else "n/a"
        print(f"| {name} | {medians[name]:.3f} | {share_text} | {rate:.0f} |")
    print(f"ours / trl step time: {medians['ours'] / medians['trl']:.2f}x")


if __name__ == "__main__":
    main()
