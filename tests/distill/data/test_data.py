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


# --- the tokenized cache ------------------------------------------------------------------------------------------


def _chat(i):
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What is {i} + 1?"},
            {"role": "assistant", "content": f"The answer is {i + 1}."},
        ]
    }


def test_cache_matches_in_memory_tokenization_across_workers(tmp_path, tokenizer, monkeypatch):
    """Rows tokenized by two worker processes over several chunks equal the in-memory path, in file order."""
    from distill.data import tokenized
    from distill.data.datasets import tokenize_records

    monkeypatch.setattr(tokenized, "CHUNK_ROWS", 7)  # 30 rows: five chunks, forked workers see the patch
    rows = [_chat(i) for i in range(30)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    settings = DataSettings(train_file=str(path), eval_fraction=0.0, cache_dir=str(tmp_path / "cache"), num_proc=2)
    train, evaluation = build_datasets(settings, tokenizer, seed=0)
    expected = tokenize_records(rows, tokenizer, settings, str(path)).examples
    assert evaluation is None and list(train) == expected


def test_second_build_maps_the_cache_and_a_change_rebuilds(tmp_path, tokenizer, monkeypatch):
    from distill.data import tokenized

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    settings = DataSettings(train_file=str(path), eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    first, _ = build_datasets(settings, tokenizer, seed=0)
    built = []
    real_build = tokenized._build
    monkeypatch.setattr(tokenized, "_build", lambda *args: built.append(args) or real_build(*args))
    again, _ = build_datasets(settings, tokenizer, seed=0)
    assert built == [] and list(again) == list(first)  # mapped, not tokenized
    build_datasets(DataSettings(**{**vars(settings), "completion_only_loss": False}), tokenizer, seed=0)
    assert len(built) == 1  # a setting that changes tokens is another key
    path.write_text(path.read_text() + json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    assert len(build_datasets(settings, tokenizer, seed=0)[0]) == 21 and len(built) == 2  # so is new content
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 3 and not list((tmp_path / "cache").glob(".*"))


def test_split_and_max_samples_are_those_of_the_list_path(tmp_path, tokenizer):
    """Held-out rows: the first eval_fraction of a permutation seeded by `seed`; max_samples counts training rows."""
    import torch

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(50)])
    settings = DataSettings(train_file=str(path), eval_fraction=0.2, max_samples=15, cache_dir=str(tmp_path / "c"))
    train, evaluation = build_datasets(settings, tokenizer, seed=3)
    held = set(torch.randperm(50, generator=torch.Generator().manual_seed(3))[:10].tolist())
    assert [e["sample_id"] for e in evaluation] == sorted(held)
    assert [e["sample_id"] for e in train] == [i for i in range(50) if i not in held][:15]


def test_bad_row_in_a_worker_names_its_line_and_leaves_no_cache(tmp_path, tokenizer, monkeypatch):
    from distill.data import tokenized

    monkeypatch.setattr(tokenized, "CHUNK_ROWS", 4)
    rows = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(12)]
    rows[9] = json.dumps({"prompt": "q", "completion": 7})
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n" + "\n".join(rows) + "\n")  # two blank lines first: row 9 is on line 12
    settings = DataSettings(train_file=str(path), cache_dir=str(tmp_path / "cache"), num_proc=2)
    with pytest.raises(ConfigError, match=r"d\.jsonl:12: field 'completion': expected a string, got int 7"):
        build_datasets(settings, tokenizer, seed=0)
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary folder went with the failed build


def test_parquet_source_through_the_cache(tmp_path, tokenizer):
    """Tables fill a column some rows lack with null: those rows are still read by their own shape."""
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "text": None} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    settings = DataSettings(train_file=str(tmp_path / "d.parquet"), eval_fraction=0.0, cache_dir=str(tmp_path / "c"))
    train, _ = build_datasets(settings, tokenizer, seed=0)
    assert [e["sample_id"] for e in train] == list(range(6)) and all(e["prompt_length"] for e in train)


def test_waiting_rank_raises_the_builders_error_or_returns_when_published(tmp_path):
    from distill.data import tokenized

    target, verdict = tmp_path / "key", tmp_path / "key.error"
    verdict.write_text("data.train_file: d.jsonl:3: field 'prompt': expected a string, got null")
    with pytest.raises(ConfigError, match=r"d\.jsonl:3: field 'prompt'"):
        tokenized._wait_for(target, verdict, "data.train_file")
    verdict.unlink()
    target.mkdir()
    (target / tokenized.META).write_text("{}")
    tokenized._wait_for(target, verdict, "data.train_file")


def test_batch_stream_draws_each_epoch_permutation_once(monkeypatch):
    """Indices are the epoch's permutation sliced per micro-batch and rank (as before), drawn once per epoch."""
    import torch

    from distill.data import batching

    draws = []
    real = torch.randperm
    monkeypatch.setattr(batching.torch, "randperm", lambda *a, **k: draws.append(a) or real(*a, **k))
    streams = [batching.BatchStream(10, 2, 2, rank, seed=5) for rank in (0, 1)]
    seen = [[s.next_indices() for _ in range(4)] for s in streams]  # two epochs of two micro-batches
    for epoch in (0, 1):
        order = real(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        for step in (0, 1):
            for rank in (0, 1):
                start = step * 4 + rank * 2
                assert seen[rank][2 * epoch + step] == order[start : start + 2]
    assert len(draws) == 4  # each of two streams: once per epoch


def test_peeked_indices_are_the_ones_later_micro_batches_take_and_the_position_stays(monkeypatch):
    """A served teacher scores the next step's micro-batches early: peek_indices(ahead) is what next_indices returns
    ``ahead`` calls later, across epoch boundaries, without moving the position or redrawing a permutation."""
    import torch

    from distill.data import batching

    draws = []
    real = torch.randperm
    monkeypatch.setattr(batching.torch, "randperm", lambda *a, **k: draws.append(a) or real(*a, **k))
    for rank in (0, 1):
        stream = batching.BatchStream(11, 2, 2, rank, seed=5)  # 2 micro-batches an epoch, 3 samples dropped
        for _ in range(7):
            at = stream.samples_consumed
            peeked = [stream.peek_indices(ahead) for ahead in range(3)]
            assert stream.samples_consumed == at
            twin = batching.BatchStream(11, 2, 2, rank, seed=5, samples_consumed=at)
            assert peeked == [twin.next_indices() for _ in range(3)]
            assert stream.next_indices() == peeked[0]
    # per rank: the stream draws epochs 0-4 once each (two kept, so no look ahead redraws one); each twin its 2 epochs
    assert len(draws) == 2 * (5 + 7 * 2)
