"""``training_config``: the one keyword-only builder the quickstart and Lion build their training stages with."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from distill.data.datasets import DataSettings
from distill.student.models import ModelSettings
from distill.training.config import TrainConfig, training_config
from kd_core.config import from_dict

NESTED = {
    "teacher": ModelSettings,
    "eval_file": DataSettings,
    "eval_fraction": DataSettings,
    "max_length": DataSettings,
    "packing": DataSettings,
}  # the flat parameters that set a section's field


def field_default(cls, name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def test_every_parameter_is_keyword_only_with_the_configs_own_default():
    parameters = inspect.signature(training_config).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    for p in parameters:
        if p.default is inspect.Parameter.empty or p.name in ("on_policy", "lora"):
            continue  # required, or a whole section (None: the section's defaults)
        if p.name in NESTED:
            assert p.default == field_default(NESTED[p.name], p.name), p.name
        elif p.name == "report_to":
            assert list(p.default) == field_default(TrainConfig, p.name)
        else:
            assert p.default == field_default(TrainConfig, p.name), p.name
    with pytest.raises(TypeError):
        training_config("student", "train.jsonl", "out", {"ce": 1.0})  # the point: no positional use


def test_builder_equals_the_config_tree_and_validates():
    built = training_config(
        student="s",
        teacher="t",
        train_file="train.jsonl",
        output_dir="out",
        loss_terms={"forward_kl": 0.5, "ce": 0.5},
        eval_fraction=0.0,
        max_length=64,
        resume="auto",
        max_steps=4,
        learning_rate=1e-3,
        per_device_train_batch_size=2,
        eval_steps=None,
        save_steps=2,
        report_to=("none",),
        seed=3,
    )
    tree = {
        "output_dir": "out",
        "resume": "auto",
        "max_steps": 4,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 2,
        "eval_steps": None,
        "save_steps": 2,
        "report_to": ["none"],
        "seed": 3,
        "model": {"student": "s", "teacher": "t"},
        "data": {"train_file": "train.jsonl", "eval_fraction": 0.0, "max_length": 64},
        "loss": {"terms": {"forward_kl": 0.5, "ce": 0.5}},
    }
    assert built == from_dict(TrainConfig, tree)
    with pytest.raises(ValueError, match="model.teacher"):
        training_config(student="s", train_file="train.jsonl", output_dir="out", loss_terms={"forward_kl": 1.0})
