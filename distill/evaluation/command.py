"""``distill eval MODEL --data FILE``: task accuracy, perplexity, generation speed and (with a teacher) token KL and
top-1 agreement, for any model directory on any dataset in the trainer's shapes.

* **accuracy**: greedy generation (``max_new_tokens``) from each prompt, the final answer taken from the generated
  text by the answer extractor and compared with the gold answer after numeric normalisation (``17.0`` = ``17``).
  Gold answers come from a ``label`` column, else from the reference answer by the same extractor (GSM8K's
  ``#### 17`` included). Datasets without prompts (``text``) have no accuracy.
* **perplexity**: ``exp`` of the model's mean cross-entropy over the counted (completion) tokens.
* **kl**, **top1_agreement**: KL(p_teacher || p_model) in nats per completion token at temperature 1 and the
  fraction of tokens where the argmaxes agree (``distill.evaluation.metrics.token_metrics``). A teacher with another
  tokenizer has none of the one-vocabulary figures (kl, top1_agreement, alpha): ``teacher_token_figures`` says why.
* **alpha**, **expected_tokens_per_round** (with a teacher, from the same pass, nothing generated): alpha = 1 - the
  mean total variation distance between the teacher's and the model's next-token distributions, the expected share
  of the model's draft tokens that speculative sampling accepts; and the tokens one draft round of ``draft.gamma``
  tokens then yields, (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al. 2023; DistillSpec).
* **tokens_per_second**: generated tokens over the wall time of the batched greedy generation.
* **acceptance_rate**, **tokens_per_teacher_pass**, **speedup**, **assisted_equal** (with a teacher, the first
  ``draft.num_prompts`` prompts): the model as the draft of speculative decoding for the teacher, i.e. the teacher's
  greedy generation with ``assistant_model=model`` against the teacher alone
  (:mod:`distill.evaluation.speculative`). ``--draft.num_prompts 0`` skips them. A teacher with another tokenizer
  reads its prompts encoded by its own tokenizer and takes the model's drafts through transformers' universal
  assisted generation (``draft_tokenizer`` says which).

Shapes: ``messages``, ``prompt``/``completion``, ``text``, and GSM8K's ``question``/``answer`` (read as
prompt/completion). The figures are printed as a table and written as JSON with ``--output``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from distill.evaluation.speculative import DraftSettings, expected_tokens_per_round
from kd_core.answers import AnswerExtractor, gold_answer
from kd_core.atomic import atomic_write_json, remove_temporaries
from kd_core.commands import EXIT_OK
from kd_core.config import ConfigError, option, parse_command_line, section
from kd_core.generation import encode_prompt, generate_batched

METRIC_NAMES = (
    "accuracy",
    "perplexity",
    "loss",
    "kl",
    "top1_agreement",
    "alpha",
    "tokens_per_second",
    "acceptance_rate",
    "speedup",
    "parameters",
)


@dataclasses.dataclass
class EvalConfig:
    model: str = option("", help="Model directory (Hugging Face format, with its tokenizer).", positional=True)
    data: str = option("", help="Dataset: .jsonl/.json/.parquet or a saved `datasets` folder, in a supported shape.")
    teacher: str | None = option(
        None, help="Teacher directory: KL and top-1 agreement (same tokenizer) and the model as its draft (any)."
    )
    num_samples: int | None = option(None, help="Evaluate the first N records only; null = all.")
    max_new_tokens: int = option(96, help="Greedy generation length for accuracy and speed.")
    batch_size: int = option(32, help="Records per forward pass / per generate() call.")
    max_length: int = option(512, help="Token truncation for the token-level figures.")
    extractor: AnswerExtractor = section(AnswerExtractor, help="How the final answer is read (kd_core.answers).")
    draft: DraftSettings = section(DraftSettings, help="With a teacher: the model as its speculative-decoding draft.")
    output: str | None = option(None, help="Write the figures as JSON to this file (must not exist).")
    device: str = option("cpu", help="torch device, e.g. cpu or cuda.")

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: expected a model directory (distill eval MODEL --data FILE)")
        if not self.data:
            raise ValueError("data: expected a dataset file (--data FILE)")
        for name in ("max_new_tokens", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples: expected >= 1 or null, got {self.num_samples}")


# ------------------------------------------------------------------------------------------------------------------
# Records: prompts, references, gold answers
# ------------------------------------------------------------------------------------------------------------------


def as_trainer_record(record: dict[str, Any]) -> dict[str, Any]:
    """GSM8K's ``question``/``answer`` read as ``prompt``/``completion``; trainer shapes pass through."""
    if "messages" in record or ("prompt" in record and "completion" in record) or "text" in record:
        return record
    if "question" in record and "answer" in record:
        return {**record, "prompt": record["question"], "completion": record["answer"]}
    raise ConfigError(
        f"data: no usable columns; expected messages, prompt/completion, text or question/answer, "
        f"found {sorted(record)}"
    )


def prompt_and_gold(
    record: dict[str, Any], extractor: AnswerExtractor
) -> tuple[list[dict[str, str]] | str, str | None] | None:
    """The generation prompt (chat messages, or plain text) and the normalised gold answer (from ``label``, else
    GSM8K's ``####``, else the extractor on the reference answer); None for ``text`` records."""

    if "messages" in record:
        turns = record["messages"]
        if not turns or turns[-1]["role"] != "assistant":
            return None
        reference = turns[-1]["content"]
        prompt: list[dict[str, str]] | str = turns[:-1]
    elif "prompt" in record:
        prompt, reference = record["prompt"], record["completion"]
    else:
        return None
    label = record.get("label")
    if label is not None:
        gold = extractor.normalize(str(label))
    elif "####" in reference:
        gold = gold_answer(reference, extractor.numeric)
    else:
        gold = extractor.extract(reference)
    return prompt, gold


# ------------------------------------------------------------------------------------------------------------------
# The figures
# ------------------------------------------------------------------------------------------------------------------


def load_model(path: str | Path, device: str, field: str):
    """A model directory or a .gguf file (dequantized), checked before any weight is read."""
    from distill.student.models import require_model_dir
    from kd_core.pretrained import load_causal_lm

    require_model_dir(path, field)
    return load_causal_lm(path, field).to(device).eval()


CROSS_TOKENIZER_SKIP = (
    "skipped: the teacher's tokenizer differs from the model's; kl, top1_agreement and alpha compare the two "
    "next-token distributions over one vocabulary"
)


def checked_tokenizers(cfg: EvalConfig):
    """The model's tokenizer and the teacher's when it differs (None when the two vocabularies are the same), read
    before any weight loads: a bad teacher directory should fail in seconds, not after minutes of loading."""
    from kd_core.pretrained import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, "model")
    if cfg.teacher is None:
        return tokenizer, None
    teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher")
    return tokenizer, None if teacher_tokenizer.get_vocab() == tokenizer.get_vocab() else teacher_tokenizer


def token_figures(cfg: EvalConfig, records: list[dict[str, Any]], model, tokenizer, teacher) -> dict[str, Any]:
    """Loss, perplexity, KL, top-1 agreement, alpha and the expected tokens per draft round over the records' counted
    tokens, through the objective's chunked kernels (its default ``loss.chunk_size``)."""
    from distill.data.datasets import DataSettings, collate, tokenize_records
    from distill.evaluation.metrics import token_metrics
    from distill.losses.divergences import shared_vocab_size
    from distill.losses.objective import LossSettings

    teacher_vocab = teacher.config.vocab_size if teacher is not None else model.config.vocab_size
    vocab = shared_vocab_size(model.config.vocab_size, teacher_vocab, len(tokenizer))
    # The source names the file, so a bad row reads `file:line` (records keep the file's order; only a prefix is cut).
    dataset = tokenize_records(
        records, tokenizer, DataSettings(train_file=str(cfg.data), max_length=cfg.max_length), str(cfg.data)
    )
    size, batch_size = len(dataset), cfg.batch_size
    batches = (
        {
            k: v.to(cfg.device)
            for k, v in collate(
                [dataset[i] for i in range(j, min(j + batch_size, size))], tokenizer.pad_token_id
            ).items()
        }
        for j in range(0, size, batch_size)
    )
    tokens = token_metrics(model, teacher, batches, vocab, chunk_size=LossSettings().chunk_size)
    alpha = tokens.get("alpha")
    return {
        "loss": tokens["loss"],
        "perplexity": math.exp(min(tokens["loss"], 50.0)),
        "tokens": tokens["tokens"],
        "kl": tokens.get("kl"),
        "top1_agreement": tokens.get("top1_agreement"),
        "alpha": alpha,
        "expected_tokens_per_round": None if alpha is None else expected_tokens_per_round(alpha, cfg.draft.gamma),
        "draft_gamma": cfg.draft.gamma,
    }


def generation_figures(cfg: EvalConfig, records: list[dict[str, Any]], model, tokenizer) -> dict[str, Any]:
    """Accuracy of the greedy answers against the gold ones, generation speed, and the per-record samples."""
    extractor = cfg.extractor
    tasks = [(i, pg) for i, pg in enumerate(prompt_and_gold(r, extractor) for r in records) if pg is not None]
    generations, seconds = generate_batched(
        model, tokenizer, [encode_prompt(tokenizer, pg[0]) for _, pg in tasks], cfg.max_new_tokens, cfg.batch_size
    )
    generated = sum(g.new_tokens for g in generations)
    samples = []
    correct = scored = 0
    for (row, (_, gold)), generation in zip(tasks, generations):
        predicted = extractor.extract(generation.text)
        match = gold is not None and predicted == gold
        scored += gold is not None
        correct += match
        samples.append(
            {"row": row, "generation": generation.text, "predicted": predicted, "gold": gold, "correct": match}
        )
    return {
        "accuracy": correct / scored if scored else None,
        "scored": scored,
        "generated_tokens": generated,
        "tokens_per_second": generated / seconds if seconds > 0 else None,
        "samples": samples,
        "prompts": [pg[0] for _, pg in tasks],
    }


def measure(cfg: EvalConfig) -> dict[str, Any]:
    """Every figure of the module docstring for one model on one dataset, plus the per-record generations."""
    from distill.losses.head import output_head
    from distill.student.models import require_model_dir
    from kd_core.records import load_records

    require_model_dir(cfg.model, "model")  # both directories are checked before anything reads them
    if cfg.teacher is not None:
        require_model_dir(cfg.teacher, "teacher")
    tokenizer, teacher_tokenizer = checked_tokenizers(cfg)
    records = [as_trainer_record(r) for r in load_records(cfg.data, "data")][: cfg.num_samples]
    model = load_model(cfg.model, cfg.device, "model")
    output_head(model)  # a family whose output head cannot be reproduced is refused before any work
    teacher = load_model(cfg.teacher, cfg.device, "teacher") if cfg.teacher is not None else None
    if teacher is not None:
        output_head(teacher)
    results: dict[str, Any] = {
        "model": str(cfg.model),
        "data": str(cfg.data),
        "records": len(records),
        "parameters": sum(p.numel() for p in model.parameters()),
        **token_figures(cfg, records, model, tokenizer, teacher if teacher_tokenizer is None else None),
    }
    if teacher_tokenizer is not None:
        results["teacher_token_figures"] = CROSS_TOKENIZER_SKIP
    generated = generation_figures(cfg, records, model, tokenizer)
    samples, prompts = generated.pop("samples"), generated.pop("prompts")
    results.update(generated)
    if teacher is not None and cfg.draft.num_prompts > 0 and prompts:
        results.update(draft_figures(cfg, prompts, model, teacher, tokenizer, teacher_tokenizer))
    results["samples"] = samples
    return results


def draft_figures(cfg: EvalConfig, prompts: list, model, teacher, tokenizer, teacher_tokenizer) -> dict[str, Any]:
    """The model as the teacher's draft on the first ``draft.num_prompts`` prompts, encoded by the teacher's tokenizer
    (:mod:`distill.evaluation.speculative`); across tokenizers through universal assisted generation."""
    from distill.evaluation.speculative import draft_metrics

    own = teacher_tokenizer if teacher_tokenizer is not None else tokenizer
    tok: dict[str, Any] = {}
    # transformers 5.24 picks universal assisted generation by the configs' vocab_size alone: it refuses the two
    # tokenizers when the sizes agree and demands them when they differ (a padded embedding, same tokenizer).
    if model.config.vocab_size != teacher.config.vocab_size:
        tok = {"tokenizer": own, "assistant_tokenizer": tokenizer}
    elif teacher_tokenizer is not None:
        return {
            "draft_figures": "skipped: the tokenizers differ but both models have vocab_size "
            f"{model.config.vocab_size}, which transformers {_version()} takes for one tokenizer"
        }
    encoded = [encode_prompt(own, prompt) for prompt in prompts[: cfg.draft.num_prompts]]
    eos = own.eos_token_id
    pad = own.pad_token_id if own.pad_token_id is not None else eos
    return draft_metrics(model, teacher, encoded, cfg.draft.max_new_tokens, pad, eos, **tok)


def _version() -> str:
    import transformers

    return transformers.__version__


def format_table(rows: list[dict[str, Any]], names: list[str] | None = None) -> str:
    """A plain-text table: one row per evaluated model, one column per figure (``-`` where not measured)."""
    names = names or [Path(r["model"]).name or r["model"] for r in rows]
    header = ["model", *METRIC_NAMES]
    cells = [header]
    for name, row in zip(names, rows):
        line = [name]
        for key in METRIC_NAMES:
            value = row.get(key)
            line.append("-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4g}")
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells
    )


Config = EvalConfig


def run(cfg: EvalConfig) -> dict[str, Any]:
    """The figures (:func:`measure`), printed as a table and written as JSON to ``cfg.output`` when set."""
    output = Path(cfg.output) if cfg.output else None
    if output is not None and output.exists():
        raise ConfigError(f"output: {output} already exists; choose another file")
    results = measure(cfg)
    print(format_table([results]))
    for key in ("teacher_token_figures", "draft_figures"):
        if key in results:
            print(f"{key}: {results[key]}")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_temporaries(output)  # left by an eval killed while writing this file (the file itself is absent)
        atomic_write_json(output, results)
        print(f"wrote {output}")
    return results


def main(argv: list[str]) -> int:
    cfg = parse_command_line(EvalConfig, argv, "distill eval", __doc__ or "")
    run(cfg)
    return EXIT_OK
