"""Datasets for distillation: load, detect the shape, apply the chat template, mask the prompt, collate.

Three shapes are understood, as in TRL's SFT conventions:

* ``messages``: a list of ``{"role", "content"}`` turns; the loss covers assistant turns.
* ``prompt`` / ``completion``: strings; the chat template is applied (user turn, assistant turn) when the tokenizer
  has one, otherwise they are concatenated; the loss covers the completion.
* ``text``: plain text; the loss covers every token.
* ``prompt`` alone, or ``messages`` ending in a user turn: prompts only, for on-policy training, where the student
  (or the teacher) writes every completion (:mod:`distill.training.on_policy`).

Every example keeps ``sample_id`` (its row index in the source file), so anything keyed by sample, such as the
offline teacher-logit store, reads the right rows whatever the shuffling, accumulation or number of processes;
``prompt_length`` (the tokens a model is given to write the completion: the prompt with the chat template's
generation prompt; None for ``text``) and ``has_completion`` (False for prompts only).

A record written by ``data-gen`` with ``teacher.logprobs`` carries ``completion_token_ids`` (the teacher's ids as it
generated them) and ``completion_vocab_sha256`` (their vocabulary): with a tokenizer of that vocabulary, those ids
ARE the completion (the text is not re-tokenized), so the rows of the store captured with them line up with the
counted tokens by construction; with another vocabulary the text is tokenized as usual.

:func:`build_datasets` (training) reads the memory-mapped cache of :mod:`distill.data.tokenized`, which tokenizes
each file once with the functions here; :func:`tokenize_records` tokenizes small sets in memory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from distill.data.cross import chat_messages, collate_teacher, cross_columns
from distill.data.records import check_completion_ids, check_record, detect_shape, row_ce_weight
from kd_core.config import ConfigError, option
from kd_core.records import iter_json_objects
from kd_core.topk_store import vocab_hash

IGNORE_INDEX = -100
SHAPES = ("messages", "prompt_completion", "text", "prompt")


@dataclasses.dataclass
class DataSettings:
    train_file: str = option(
        "", help="Training data: a .jsonl/.json/.parquet file or a `datasets.save_to_disk` folder."
    )
    eval_file: str | None = option(None, help="Held-out data in the same shapes; if unset, `eval_fraction` of train.")
    eval_fraction: float = option(0.05, help="Fraction of the training file held out for eval when eval_file is unset.")
    format: Literal["auto", "messages", "prompt_completion", "text", "prompt"] = option(
        "auto",
        help="Dataset shape; `auto` picks messages, then prompt/completion, then text, then prompt alone "
        "(prompts only: on-policy training samples every completion).",
    )
    max_length: int = option(512, help="Sequences are truncated to this many tokens.")
    completion_only_loss: bool = option(
        True, help="Count only completion (assistant) tokens in the loss; false trains on prompts too."
    )
    max_samples: int | None = option(None, help="Use at most this many training examples (for quick runs).")
    packing: bool = option(
        False,
        help="Pack each training micro-batch's examples back to back (first-fit decreasing into rows of "
        "`max_length` tokens, or fewer, longer rows where the student's shape makes them cheaper: padding costs "
        "every layer's matmuls, long rows cost attention); position ids restart per "
        "example, so attention stays within each one (transformers' packed-sequence masks); logit terms and `ce` "
        "only. Held-out batches stay padded.",
    )
    step_by_step_label_weight: float | None = option(
        None,
        help="Distilling step-by-step: each record's `prompt`, `rationale` and `label` columns (as written by "
        "`data-gen cot`) become two examples, '[label] ' + prompt -> label with loss weight w and '[rationale] ' + "
        "prompt -> rationale with weight 1 - w; null = plain training on the detected shape.",
    )
    ce_weight_field: str | None = option(
        None,
        help="Name of a numeric record field (>= 0) that multiplies that row's `ce` weight; rows without it weigh "
        "1. The teacher's terms are not weighted, so 0 makes a row a distillation-only row: e.g. general text "
        "mixed into task data, whose human-written answers should not pull the student away from the teacher. "
        "null: every row 1.",
    )
    cache_dir: str | None = option(
        None,
        help="Where each data file is tokenized once (memory-mapped Arrow files, keyed by the file's content, "
        "the tokenizer and the settings that change tokens) and mapped by every later run; default "
        "$HF_DATASETS_CACHE/distill_kd (~/.cache/huggingface/datasets/distill_kd). Delete the folder to clear it.",
    )
    num_proc: int | None = option(
        None,
        help="Processes that tokenize a file the first time (default: the CPUs this process may use, at most "
        "32; 1 = in this process).",
    )

    def __post_init__(self) -> None:
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc: expected at least 1 or null, got {self.num_proc}")
        if self.step_by_step_label_weight is not None and not 0.0 <= self.step_by_step_label_weight <= 1.0:
            raise ValueError(
                f"step_by_step_label_weight: expected a number in [0, 1] or null, got {self.step_by_step_label_weight}"
            )
        if self.ce_weight_field is not None and not self.ce_weight_field.strip():
            raise ValueError("ce_weight_field: expected a field name or null, got an empty string")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: expected a number in [0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise ValueError(f"max_length: expected at least 2, got {self.max_length}")


def _has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "{% generation %}" in template


def _template_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding (transformers 5.23 without return_dict=False)
        ids = ids["input_ids"]
    return list(ids)


def _plain_prompt_example(
    record: dict[str, Any], shape: str, tokenizer: PreTrainedTokenizerBase, max_length: int, completion_only: bool
) -> dict[str, Any]:
    """A prompt (and completion) for a tokenizer without a chat template: the two texts concatenated, EOS after the
    completion."""
    prompt_ids = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    completion_ids = []
    if shape == "prompt_completion":
        completion_ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {
        "input_ids": ids,
        "labels": labels if completion_only else list(ids),
        "prompt_length": min(len(prompt_ids), max_length),
        "has_completion": shape == "prompt_completion",
    }


def tokenize_example(
    record: dict[str, Any],
    shape: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    completion_only: bool,
) -> dict[str, Any]:
    """Token ids and labels (prompt tokens set to -100 when ``completion_only``) for one record, with its
    ``prompt_length`` and ``has_completion`` (see the module docstring)."""
    if shape == "text":
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        return {"input_ids": ids, "labels": list(ids), "prompt_length": None, "has_completion": True}

    if _generated_ids(record, shape, tokenizer) is not None:
        return _generated_example(record, shape, tokenizer, max_length, completion_only)
    if tokenizer.chat_template is None and shape in ("prompt_completion", "prompt"):
        return _plain_prompt_example(record, shape, tokenizer, max_length, completion_only)

    messages = chat_messages(record, shape)
    if messages[-1]["role"] != "assistant":  # a conversation waiting for its answer: a prompt only
        ids = _template_ids(tokenizer, messages, add_generation_prompt=True)[:max_length]
        return {
            "input_ids": ids,
            "labels": [IGNORE_INDEX] * len(ids),
            "prompt_length": len(ids),
            "has_completion": False,
        }
    # The prompt of the final assistant turn, as generation would be given it.
    prompt_ids = _template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    if _has_generation_markers(tokenizer):
        # The template marks assistant spans itself: every assistant turn is a target, multi-turn included.
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, assistant = list(out["input_ids"]), list(out["assistant_masks"])
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, assistant)]
    else:
        # Without markers, the target is the final assistant turn: the prompt is everything before it.
        ids = _template_ids(tokenizer, messages)
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(ids[len(prompt_ids) :])
    ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": ids,
        "labels": labels if completion_only else list(ids),
        "prompt_length": min(len(prompt_ids), max_length),
        "has_completion": True,
    }


_VOCABULARIES: dict[int, str] = {}  # id(tokenizer) -> vocab_hash: one hash per tokenizer and process, not per row


def _generated_ids(record: dict[str, Any], shape: str, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The record's ``completion_token_ids`` when they are in ``tokenizer``'s vocabulary (see the module docstring)."""
    ids = record.get("completion_token_ids")
    if ids is None or shape not in ("messages", "prompt_completion"):
        return None
    if id(tokenizer) not in _VOCABULARIES:
        _VOCABULARIES[id(tokenizer)] = vocab_hash(tokenizer)
    return ids if record.get("completion_vocab_sha256") == _VOCABULARIES[id(tokenizer)] else None


def _generated_example(
    record: dict[str, Any], shape: str, tokenizer: PreTrainedTokenizerBase, max_length: int, completion_only: bool
) -> dict[str, Any]:
    """The prompt tokenized as generation is given it, then the completion's own ids (end-of-turn token included,
    as generated): the counted labels are exactly those ids unless ``max_length`` cuts them."""
    completion = [int(t) for t in record["completion_token_ids"]]
    if tokenizer.chat_template is None:
        prompt_ids = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    else:
        prompt_ids = _template_ids(tokenizer, chat_messages(record, shape)[:-1], add_generation_prompt=True)
    ids = (list(prompt_ids) + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion)[:max_length]
    return {
        "input_ids": ids,
        "labels": labels if completion_only else list(ids),
        "prompt_length": min(len(prompt_ids), max_length),
        "has_completion": True,
    }


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of tokenized examples, each with its ``sample_id`` (row in the source file): small in-memory sets
    (the eval command, tests). Training data is :class:`distill.data.tokenized.ArrowExamples`."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]

    def first_without_completion(self) -> int | None:
        """The ``sample_id`` of the first prompt-only example, or None."""
        return next((e["sample_id"] for e in self.examples if not e["has_completion"]), None)


def record_shape(record: dict[str, Any], settings: DataSettings, where: str) -> str:
    """The shape every row of a file must have, detected from its first row (``where``)."""
    return (
        "prompt_completion"
        if settings.step_by_step_label_weight is not None
        else detect_shape(record, settings.format, where)
    )


def examples_of(
    record: dict[str, Any],
    shape: str,
    tokenizer: PreTrainedTokenizerBase,
    settings: DataSettings,
    where: str,
    first: str | None = None,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[dict[str, Any]]:
    """A record checked (ConfigError naming ``where``) and tokenized into its examples, each with a ``loss_weight``:
    one example (weight 1), or two with ``step_by_step_label_weight`` w (a label example, weight w, and a rationale
    example, 1 - w). Examples truncated to no target are left out; prompts only (on-policy) are kept, having none
    until a model writes them. ``first`` (where the shape was detected) checks that the row has that shape.
    ``teacher_tokenizer`` (cross-tokenizer distillation) adds the teacher's ids and the aligned positions
    (:func:`distill.data.cross.cross_columns`)."""
    w = settings.step_by_step_label_weight
    if w is None:
        check_record(record, shape, where, first if settings.format == "auto" else None)
        if _generated_ids(record, shape, tokenizer) is not None:
            check_completion_ids(record, shape, len(tokenizer), where)
        weighted = [(record, 1.0)]
    else:
        missing = [c for c in ("prompt", "rationale", "label") if not isinstance(record.get(c), str)]
        if missing:
            raise ConfigError(
                f"{where}: step-by-step training needs string columns "
                f"{missing} (prompt, rationale, label; `data-gen cot` writes them)"
            )
        weighted = [
            ({"prompt": "[label] " + record["prompt"], "completion": record["label"]}, w),
            ({"prompt": "[rationale] " + record["prompt"], "completion": record["rationale"]}, 1.0 - w),
        ]
    if settings.ce_weight_field is not None:
        scale = row_ce_weight(record, settings.ce_weight_field, where)
        weighted = [(one, weight * scale) for one, weight in weighted]
    examples = []
    for one, weight in weighted:
        example = tokenize_example(one, shape, tokenizer, settings.max_length, settings.completion_only_loss)
        if not example["has_completion"] or any(label != IGNORE_INDEX for label in example["labels"][1:]):
            example["loss_weight"] = weight
            if teacher_tokenizer is not None:
                counted = [label != IGNORE_INDEX for label in example["labels"]]
                example.update(
                    cross_columns(
                        one, shape, example, counted, tokenizer, teacher_tokenizer, settings.max_length, where
                    )
                )
            examples.append(example)
    return examples


def tokenize_records(
    records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    settings: DataSettings,
    source: str,
    row_ids: list[int] | None = None,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> TokenizedDataset:
    """Tokenizes records in memory (small sets: the eval command, tests); ``row_ids`` are their rows in the source
    file (default 0..n-1). Each example carries a ``loss_weight`` (see :func:`examples_of`)."""
    row_ids = list(range(len(records))) if row_ids is None else row_ids
    path = Path(source)
    lines = [line for line, _, _ in iter_json_objects(path)] if path.suffix == ".jsonl" and path.is_file() else None
    wheres = [f"{source}:{lines[row]}" if lines else f"{source}: row {row}" for row in row_ids]
    shape = record_shape(records[0], settings, wheres[0]) if records else "text"
    examples = []
    for row, record, where in zip(row_ids, records, wheres):
        for example in examples_of(record, shape, tokenizer, settings, where, wheres[0], teacher_tokenizer):
            example["sample_id"] = row
            examples.append(example)
    if not examples:
        raise ConfigError(f"{source}: no example has target tokens within max_length={settings.max_length}")
    return TokenizedDataset(examples)


def build_datasets(
    settings: DataSettings,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
):
    """Train and eval sets (:class:`distill.data.tokenized.ArrowExamples`) from the tokenized cache of each file;
    eval is carved from train (deterministically for ``seed``) when no file is given, and keeps only examples with
    a completion (token metrics need targets); None when there is no eval set. ``teacher_tokenizer``: each example
    also holds the teacher's tokens and the aligned positions (cross-tokenizer distillation)."""
    from distill.data.tokenized import RowFunctions, split_examples

    return split_examples(settings, tokenizer, seed, RowFunctions(record_shape, examples_of), teacher_tokenizer)


def collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch; padding gets attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    sample_ids = torch.tensor([e["sample_id"] for e in examples], dtype=torch.long)
    loss_weights = torch.tensor([e.get("loss_weight", 1.0) for e in examples], dtype=torch.float32)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "sample_ids": sample_ids,
        "loss_weights": loss_weights,
    }
    if "teacher_input_ids" in examples[0]:  # cross-tokenizer distillation
        batch.update(collate_teacher(examples))
    return batch
