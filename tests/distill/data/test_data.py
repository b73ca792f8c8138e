"""Dataset shapes, chat templates, completion-only masks, and the errors for unusable data."""

from __future__ import annotations

import json

import pytest

from distill.data.datasets import IGNORE_INDEX, DataSettings, build_datasets, collate, tokenize_example
from kd_core.config import ConfigError
from kd_core.records import load_records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def targets_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_prompt_completion_masks_the_prompt(tokenizer):
    example = tokenize_example(
        {"prompt": "What is 2 plus 2?", "completion": "The answer is 4."}, "prompt_completion", tokenizer, 128, True
    )
    full = tokenizer.decode(example["input_ids"])
    assert full.startswith("<|user|>\nWhat is 2 plus 2?</s>\n<|assistant|>\n")  # the chat template was applied
    assert targets_text(tokenizer, example) == "The answer is 4.</s>"


def test_messages_train_on_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Color?"},
        {"role": "assistant", "content": "Blue."},
    ]
    example = tokenize_example({"messages": messages}, "messages", tokenizer, 256, True)
    assert targets_text(tokenizer, example) == "Hello.</s>Blue.</s>"


def test_completion_only_off_trains_on_everything(tokenizer):
    example = tokenize_example({"prompt": "a", "completion": "b"}, "prompt_completion", tokenizer, 128, False)
    assert example["labels"] == example["input_ids"]


def test_text_shape_and_truncation(tokenizer):
    example = tokenize_example({"text": "The quick brown fox jumps over the lazy dog."}, "text", tokenizer, 5, True)
    assert len(example["input_ids"]) == 5 and example["labels"] == example["input_ids"]


def test_build_datasets_detects_shape_and_holds_out_eval(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)])
    train, evaluation = build_datasets(DataSettings(train_file=str(path), eval_fraction=0.1), tokenizer, seed=0)
    assert len(train) == 36 and len(evaluation) == 4
    ids = {e["sample_id"] for e in train} | {e["sample_id"] for e in evaluation}
    assert len(ids) == 40  # every example keeps a distinct id


def test_parquet_and_saved_dataset(tmp_path, tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"text": f"sample number {i}"} for i in range(6)])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(load_records(tmp_path / "d.parquet")) == 6
    assert len(load_records(tmp_path / "saved")) == 6


def test_collate_pads_and_masks(tokenizer):
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "sample_id": 0}
    b = {"input_ids": [8], "labels": [8], "sample_id": 1}
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"question": "q", "reply": "r"}], "no usable column; expected `messages`"),
        ([], "is empty"),
    ],
)
def test_unusable_data_is_a_clear_error(tmp_path, tokenizer, records, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ConfigError, match=message):
        build_datasets(DataSettings(train_file=str(path)), tokenizer, seed=0)


def test_missing_file_names_the_field(tokenizer):
    with pytest.raises(ConfigError, match="data.train_file: file not found"):
        build_datasets(DataSettings(train_file="/nonexistent/train.jsonl"), tokenizer, seed=0)


def test_requested_format_needs_its_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(ConfigError, match="format 'messages' needs column"):
        build_datasets(DataSettings(train_file=str(path), format="messages"), tokenizer, seed=0)
