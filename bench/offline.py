"""Benchmark: offline teacher logits (the top-k store) -- bytes per token, fidelity, and training step time.

    python bench/offline.py --steps 6                         # all three parts
    python bench/offline.py --parts size,fidelity             # no training runs

Parts (ratios are measured within this one run):
  size      bytes per token of real store files for k = 16, 50, 64, 128 at vocabularies 32,000 and 151,936, 8- and
            4-bit values; compared with DistillKit's reported ~114 bytes/token at k = 50.
  fidelity  forward KL from top-k targets (bucketed with a tail, decoded from the store) vs the full-vocabulary KL,
            on Zipf-shaped synthetic teacher/student logits (V = 32,000; no real LM is installed here).
  step      `distill train` step time of plain SFT (ce only), offline KD from a store, and online KD with a teacher
            of twice the student's depth, each in a fresh process (peak RSS = ru_maxrss), on GSM8K questions from
            ../shared/data when present (else synthetic sums). Tiny CPU models: a loaded machine makes times noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DISTILLKIT_K50 = 114.0


def part_size() -> None:
    from distill.offline.store import Codec, ShardWriter

    print("## bytes per token (file size / tokens)")
    print("| vocab | k | value bits | bytes/token | vs DistillKit k=50 (114) |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    tokens = 512
    for vocab in (32_000, 151_936):
        for k in (16, 50, 64, 128):
            for bits in (8, 4):
                codec = Codec(vocab, k, bits)
                with tempfile.TemporaryDirectory() as tmp:
                    writer = ShardWriter(Path(tmp), 0, 1, codec)
                    ids = (
                        np.argsort(rng.random((tokens, vocab)), axis=1)[:, :k]
                        if vocab < 40_000
                        else np.stack([rng.choice(vocab, k, replace=False) for _ in range(tokens)])
                    )
                    logp = np.sort(-rng.exponential(3.0, (tokens, k)), axis=1)[:, ::-1].astype(np.float32)
                    writer.add(0, 0, ids, logp, np.full(tokens, -2.0, np.float32))
                    info = writer.close()
                    size = (Path(tmp) / info["data"]).stat().st_size
                ratio = f"{size / tokens / DISTILLKIT_K50:.2f}x" if k == 50 else ""
                print(f"| {vocab} | {k} | {bits} | {size / tokens:.1f} | {ratio} |")


def zipf_logits(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """LM-like logits: a random token order with log-probabilities falling as -1.1 log(rank), plus noise."""
    ranks = torch.argsort(torch.rand(n, vocab, generator=gen), dim=1).float() + 1
    return -1.1 * ranks.log() + 0.5 * torch.randn(n, vocab, generator=gen)


def part_fidelity(vocab: int = 32_000, n: int = 512) -> None:
    from distill.losses import divergences as losses
    from distill.losses.topk import TopKTargets, topk_per_token
    from distill.offline.store import Codec

    gen = torch.Generator().manual_seed(0)
    teacher = zipf_logits(n, vocab, gen)
    student = teacher + 0.8 * torch.randn(n, vocab, generator=gen)  # a student that roughly agrees
    full = losses.per_token_divergence(student, teacher, "forward_kl").mean().item()
    logp = torch.log_softmax(teacher, -1)
    print(f"\n## fidelity: forward KL, V = {vocab}, {n} tokens; full-vocabulary KL = {full:.4f}")
    print("| k | top-k mass | top-k KL, exact values | ratio to full | top-k KL, 8-bit store | ratio | 4-bit | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for k in (16, 64, 128):
        top, ids = logp.topk(k, -1)
        tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1)
        exact = topk_per_token(student, TopKTargets(ids, top, tail), "forward_kl").mean().item()
        row = [f"{k}", f"{top.exp().sum(1).mean().item():.3f}", f"{exact:.4f}", f"{exact / full:.3f}"]
        for bits in (8, 4):
            codec = Codec(vocab, k, bits)
            d_ids, d_logp, d_tail = codec.decode(codec.encode(ids.numpy(), top.numpy(), tail.numpy()))
            targets = TopKTargets(torch.from_numpy(d_ids), torch.from_numpy(d_logp), torch.from_numpy(d_tail))
            value = topk_per_token(student, targets, "forward_kl").mean().item()
            row += [f"{value:.4f}", f"{value / full:.3f}"]
        print("| " + " | ".join(row) + " |")


def write_data(path: Path, count: int) -> list[str]:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl"
    if shared.is_file():
        rows = [json.loads(line) for line in shared.read_text().splitlines()[:count]]
        records = [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
    else:
        records = [
            {"prompt": f"What is {i} plus {i + 3}?", "completion": f"{i} + {i + 3} = {2 * i + 3}."}
            for i in range(count)
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [r["prompt"] + " " + r["completion"] for r in records]


def make_distiller(root: Path, variant: str, kd_terms: str, steps: int):
    from distill.training.train import Distiller, TrainConfig
    from kd_core.config import from_dict

    loss = {"terms": {"ce": 1.0}} if variant == "sft" else {"terms": json.loads(kd_terms)}
    model = {"student": str(root / "student")}
    if variant == "offline":
        loss["teacher_store"] = str(root / "store")
    if variant == "online":
        model["teacher"] = str(root / "teacher")
    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(root / f"run-{variant}"),
            "overwrite_output_dir": True,
            "max_steps": steps + 1,
            "save_steps": 10_000,
            "eval_steps": None,
            "report_to": ["none"],
            "per_device_train_batch_size": 8,
            "model": model,
            "data": {"train_file": str(root / "train.jsonl"), "eval_fraction": 0.0, "max_length": 256},
            "loss": {**loss, "chunk_size": 512},
        },
    )
    return Distiller(cfg)


def worker(args: argparse.Namespace) -> None:
    distiller = make_distiller(Path(args.root), args.worker, args.kd_terms, args.steps)
    distiller.training_step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        distiller.training_step()
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "step_s": statistics.median(times),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def part_step(args: argparse.Namespace) -> None:
    from distill.offline.precompute import PrecomputeConfig, run
    from distill.student.tiny import tiny_llama, train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench_offline_"))
    texts = write_data(root / "train.jsonl", 256)
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab)
    for name, layers in (("student", args.layers), ("teacher", 2 * args.layers)):
        tiny_llama(len(tokenizer), hidden_size=args.hidden, num_layers=layers, seed=layers).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    started = time.perf_counter()
    run(
        PrecomputeConfig(
            teacher=str(root / "teacher"),
            output_dir=str(root / "store"),
            k=args.k,
            data=__import__("distill.data.datasets", fromlist=["DataSettings"]).DataSettings(
                train_file=str(root / "train.jsonl"), eval_fraction=0.0, max_length=256
            ),
        )
    )
    print(
        f"\n## step time (vocab {len(tokenizer)}, student {args.layers} layers x {args.hidden}, teacher "
        f"{2 * args.layers} layers, k = {args.k}, KD terms {args.kd_terms}; "
        f"precompute of 256 examples took {time.perf_counter() - started:.1f} s)"
    )
    results = {}
    for variant in ("sft", "offline", "online"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                variant,
                "--root",
                str(root),
                "--steps",
                str(args.steps),
                "--kd-terms",
                args.kd_terms,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| variant | median step (s) | vs SFT | peak RSS (MB) |")
    print("|---|---|---|---|")
    for variant, r in results.items():
        ratio = r["step_s"] / results["sft"]["step_s"]
        print(f"| {variant} | {r['step_s']:.3f} | {ratio:.2f}x | {r['peak_rss_mb']:.0f} |")
    off, on = results["offline"], results["online"]
    print(
        f"\noffline / SFT step time: {off['step_s'] / results['sft']['step_s']:.2f}x (target <= 1.10x); "
        f"online / offline: step {on['step_s'] / off['step_s']:.2f}x, "
        f"peak RSS {on['peak_rss_mb'] / off['peak_rss_mb']:.2f}x"
    )
    interleaved(root, args)


def interleaved(root: Path, args: argparse.Namespace) -> None:
    """The three variants in one process, one step of each in turn: load drift on a shared machine hits all three
    alike, so the ratios are steadier than those of the separate processes above (which also give peak memory)."""
    runs = {v: make_distiller(root, v, args.kd_terms, 2 * args.steps) for v in ("sft", "offline", "online")}
    times: dict[str, list[float]] = {v: [] for v in runs}
    for distiller in runs.values():
        distiller.training_step()  # warm-up
    for _ in range(2 * args.steps):
        for variant, distiller in runs.items():
            start = time.perf_counter()
            distiller.training_step()
            times[variant].append(time.perf_counter() - start)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(
        f"interleaved medians (s): sft {med['sft']:.3f}, offline {med['offline']:.3f}, online {med['online']:.3f}; "
        f"offline / SFT {med['offline'] / med['sft']:.2f}x (target <= 1.10x), online / offline "
        f"{med['online'] / med['offline']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="size,fidelity,step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary for the step-time models")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2, help="student depth (the teacher has twice as many)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument(
        "--kd-terms",
        default='{"forward_kl": 0.9, "ce": 0.1}',
        help="loss terms (JSON) of the offline and online variants; SFT is always {ce: 1}",
    )
    parser.add_argument("--worker", choices=("sft", "offline", "online"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.worker:
        worker(args)
        return
    parts = args.parts.split(",")
    if "size" in parts:
        part_size()
    if "fidelity" in parts:
        part_fidelity()
    if "step" in parts:
        part_step(args)


if __name__ == "__main__":
    main()
