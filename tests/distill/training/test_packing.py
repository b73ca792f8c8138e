"""``data.packing``: a micro-batch packed into rows of at most ``max_length`` tokens with restarting position ids
gives the same loss terms and the same gradient as the padded batch (attention stays within each example), with
fewer tokens run; refused with feature terms."""

from __future__ import annotations

import pytest
import torch

from distill.data.datasets import IGNORE_INDEX, collate
from distill.data.packing import attention_weight, collate_packed, pack_rows, packing_rows, varlen_attention
from distill.training.train import Distiller, TrainConfig
from kd_core.config import ConfigError, from_dict


def config(model_dirs, train_file, out, packing, terms, attention="sdpa") -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "output_dir": str(out),
            "max_steps": 2,
            "per_device_train_batch_size": 6,
            "report_to": ["none"],
            "eval_steps": None,
            "model": {
                "teacher": str(model_dirs["teacher"]),
                "student": str(model_dirs["student"]),
                "attn_implementation": attention,
            },
            "data": {"train_file": str(train_file), "eval_fraction": 0.0, "packing": packing},
            "loss": {"terms": terms, "chunk_size": 7},
        },
    )


def terms_and_grads(distiller, batch):
    module = distiller.module
    module.zero_grad()
    with distiller.teacher_targets(batch) as teacher:
        terms = module(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            teacher=teacher,
            loss_weights=batch["loss_weights"],
            position_ids=batch.get("position_ids"),
        )
    sum(terms.values()).backward()
    return (
        {k: v.item() for k, v in terms.items()},
        {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
    )


def test_first_fit_decreasing_rows_hold_every_example_once_within_capacity():
    lengths = [5, 9, 3, 7, 2, 6]
    rows = pack_rows(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert len(rows) == 3  # 32 tokens need at least 3 rows of 12
    assert pack_rows(lengths, None) == [[1, 3, 5, 0, 2, 4]]
    assert pack_rows([20, 4], 12) == [[0], [1]]  # longer than a row (a sampled completion): a row of its own


def test_rows_grow_past_max_length_only_where_padding_costs_more_than_attention():
    from transformers import LlamaConfig

    lengths = [284, 468, 256, 280]  # a GSM8K chat micro-batch: no two fit in one row of 512
    assert packing_rows(lengths, 512, None) == pack_rows(lengths, 512) == [[1], [0], [3], [2]]
    smollm2 = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64
    )
    assert 1 / 3100 < attention_weight(smollm2) < 1 / 3000
    # A real model's matmuls dwarf attention at these lengths: two balanced rows (724 and 564 tokens, 1,448 cells)
    # instead of four padded to 468 (1,872 cells), and less attention than one row of 1,288.
    assert packing_rows(lengths, 512, attention_weight(smollm2)) == [[1, 2], [0, 3]]
    assert packing_rows(lengths, 512, 1e-6) == [[1, 0, 3, 2]]  # attention almost free: one row
    assert packing_rows([500] * 4, 512, 1e-6) == [[0], [1], [2], [3]]  # no padding to save: rows of max_length
    assert packing_rows(lengths, None, 1.0) == [[1, 0, 3, 2]]  # no max_length: one row, as before


# Each attention kernel that trains on CPU (flex_attention has no CPU backward in torch 2.13; it and flash run in
# bench/gpu_check.sh): "one" row is the varlen layout (what flash_attention_* get), "several" rows rely on the
# block-diagonal mask transformers builds from the position ids.
@pytest.mark.parametrize(
    ("attention", "rows"), [("sdpa", "one"), ("sdpa", "several"), ("eager", "one"), ("eager", "several")]
)
def test_packed_batch_gives_the_padded_batch_terms_and_gradients(model_dirs, train_file, tmp_path, attention, rows):
    terms = {"forward_kl": 0.5, "reverse_kl": 0.2, "ce": 0.3}
    padded_run = Distiller(config(model_dirs, train_file, tmp_path / "a", False, terms, attention))
    packed_run = Distiller(config(model_dirs, train_file, tmp_path / "b", True, terms, attention))
    examples = [padded_run.train_set[i] for i in range(6)]
    examples[2] = {**examples[2], "loss_weight": 0.25}  # per-example ce weights survive packing
    pad = padded_run.tokenizer.pad_token_id
    lengths = [len(e["input_ids"]) for e in examples]
    capacity = sum(sorted(lengths)[-2:])  # about two examples a row, unless varlen
    padded, packed = collate(examples, pad), collate_packed(examples, pad, capacity, varlen=rows == "one")
    if rows == "one":
        assert packed["input_ids"].shape == (1, sum(lengths))
    else:
        assert 1 < packed["input_ids"].shape[0] < len(examples) and packed["input_ids"].shape[1] <= capacity
        assert sorted(packed["sample_ids"].tolist()) == sorted(e["sample_id"] for e in examples)
        assert packed["attention_mask"].sum() == sum(lengths)  # padding marked, position 0, no loss weight
        assert (packed["loss_weights"][packed["attention_mask"] == 0] == 0).all()
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # less padding
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    want_terms, want_grads = terms_and_grads(padded_run, padded)
    got_terms, got_grads = terms_and_grads(packed_run, packed)
    assert got_terms.keys() == want_terms.keys()
    for name, value in want_terms.items():
        assert got_terms[name] == pytest.approx(value, rel=1e-5), name
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_training_with_packing_runs_and_feature_terms_are_refused(model_dirs, train_file, tmp_path):
    distiller = Distiller(config(model_dirs, train_file, tmp_path / "run", True, {"forward_kl": 1.0}))
    batches, _, _ = distiller.next_micro_batches()
    assert batches[0]["input_ids"].shape[0] == 1 and "position_ids" in batches[0]
    assert distiller.training_step()["forward_kl"] > 0
    with pytest.raises(ConfigError, match="data.packing: feature and relation terms compare whole padded sequences"):
        config(model_dirs, train_file, tmp_path / "x", True, {"forward_kl": 1.0, "hidden_mse": 1.0})


def test_flash_attention_packs_into_one_unpadded_row():
    assert varlen_attention("flash_attention_2") and varlen_attention("flash_attention_3")
    assert not any(varlen_attention(name) for name in ("sdpa", "eager", "flex_attention"))
    examples = [
        {"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1)), "sample_id": n} for n in (5, 9, 3)
    ]
    packed = collate_packed(examples, 0, 8, varlen=True)
    assert packed["input_ids"].shape == (1, 17) and packed["attention_mask"].all()
    assert packed["position_ids"][0].tolist() == list(range(5)) + list(range(9)) + list(range(3))
