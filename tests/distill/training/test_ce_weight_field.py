"""`data.ce_weight_field`: a per-row multiplier of the `ce` term that leaves the teacher's terms alone, so rows
with weight 0 are distillation-only rows (general text mixed into task data)."""

from __future__ import annotations

import json

import pytest

from distill.data.datasets import DataSettings, collate, tokenize_records
from kd_core.config import ConfigError
from tests.conftest import nested_config

ROWS = [
    {"prompt": "Add 2 and 3.", "completion": "5", "w": 0},
    {"prompt": "Name a colour.", "completion": "Blue.", "w": 0.5},
    {"prompt": "Add 1 and 1.", "completion": "2"},  # no field: weight 1
]


def test_the_field_scales_each_rows_ce_weight_and_bad_values_name_the_row(tokenizer):
    data = tokenize_records(ROWS, tokenizer, DataSettings(train_file="x", ce_weight_field="w"), "rows.jsonl")
    assert collate(data.examples, 0)["loss_weights"].tolist() == [0.0, 0.5, 1.0]
    plain = tokenize_records(ROWS, tokenizer, DataSettings(train_file="x"), "rows.jsonl")
    assert collate(plain.examples, 0)["loss_weights"].tolist() == [1.0, 1.0, 1.0]  # the field is read only when named
    for bad in ("0.5", -1, True, None, float("nan")):
        rows = [ROWS[2], {**ROWS[0], "w": bad}]
        with pytest.raises(ConfigError, match=r"row 1: field 'w' \(data.ce_weight_field\): expected a number >= 0"):
            tokenize_records(rows, tokenizer, DataSettings(train_file="x", ce_weight_field="w"), "rows.jsonl")


def train_config(tmp_path, model_dirs, data_file, name: str, terms: dict, **data):
    from distill.training.train import TrainConfig

    tree = {
        "output_dir": str(tmp_path / name),
        "report_to": ["none"],
        "per_device_train_batch_size": 3,
        "learning_rate": 1e-3,
        "max_steps": 1,
        "eval_steps": None,
        "save_steps": 1000,
        "seed": 3,
        "model": {"student": str(model_dirs["student"]), "teacher": str(model_dirs["teacher"])},
        "data": {"train_file": str(data_file), "eval_fraction": 0.0, "cache_dir": str(tmp_path / "cache"), **data},
        "loss": {"terms": terms},
    }
    return nested_config(TrainConfig, tree)


def test_rows_weighted_zero_train_on_the_teachers_terms_only(tmp_path, model_dirs):
    from distill.training.train import Distiller

    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps({**r, "w": 0}) + "\n" for r in ROWS))
    both = {"forward_kl": 1.0, "ce": 1.0}
    distill_only = Distiller(train_config(tmp_path, model_dirs, data_file, "zero", both, ce_weight_field="w"))
    kl_alone = Distiller(train_config(tmp_path, model_dirs, data_file, "kl", {"forward_kl": 1.0}))
    unweighted = Distiller(train_config(tmp_path, model_dirs, data_file, "both", both))
    a, b, c = (d.training_step()["loss"] for d in (distill_only, kl_alone, unweighted))
    assert a == pytest.approx(b, rel=1e-5)  # `ce` gone, the KL term unweighted
    assert c > b * 1.05  # without the field the same rows also train on `ce`


def test_a_ce_weight_field_without_ce_is_refused(tmp_path, model_dirs):
    with pytest.raises(ConfigError, match=r"data.ce_weight_field: weights the `ce` term .* has no `ce`"):
        train_config(tmp_path, model_dirs, tmp_path / "x.jsonl", "x", {"forward_kl": 1.0}, ce_weight_field="w")
