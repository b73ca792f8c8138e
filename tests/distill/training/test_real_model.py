"""``distill train`` with the real SmolLM2-135M-Instruct GGUF file as the teacher and a student pruned from it: the
teacher loads through the .gguf path, and the forward-KL loss falls on real text. The shipped teacher-correction
config trains the GGUF model itself and saves a teacher that reloads as a plain Hugging Face model."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.student.prune.families import family_for
from distill.student.prune.structured import Targets, build_pruned_model, plan_pruning
from distill.training.train import TrainConfig
from distill.training.train import run as train
from kd_core.config import parse_command_line
from tests.conftest import FIXTURES, REPO_ROOT, nested_config, write_jsonl


def test_distill_from_the_gguf_teacher_into_a_pruned_student(smollm2, smollm2_gguf, tmp_path):
    model, tokenizer = smollm2
    family = family_for(model.config)
    # Uniform depth and magnitude width need no calibration pass: the student is pruned in seconds.
    targets = Targets(num_layers=8, depth_method="uniform", intermediate_size=512, criterion="magnitude")
    student = build_pruned_model(model, family, plan_pruning(model.config, family, targets, model.state_dict(), None))
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    rows = [json.loads(line) for line in (FIXTURES / "real_text.jsonl").read_text().splitlines()][:2]
    data = write_jsonl(tmp_path / "train.jsonl", rows)  # one batch, seen every step: the loss must fall
    cfg = nested_config(
        TrainConfig,
        {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 5,
            "per_device_train_batch_size": 2,
            "learning_rate": 5e-4,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "save_steps": 100,
            "eval_steps": None,
            "logging_steps": 1,
            "report_to": ["none"],
            "model": {"teacher": str(smollm2_gguf), "student": str(tmp_path / "student")},
            "data": {"train_file": str(data), "eval_fraction": 0.0, "max_length": 96},
            "loss": {"terms": {"forward_kl": 1.0}},
        },
    )
    result = train(cfg)
    assert result.stopped is None and result.steps == 5
    losses = [
        json.loads(line)["train/forward_kl"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "train/forward_kl" in line
    ]
    assert len(losses) == 5 and losses[-1] < losses[0], losses


def test_teacher_correction_config_trains_the_gguf_model_into_a_reloadable_teacher(smollm2, smollm2_gguf, tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "real_text.jsonl").read_text().splitlines()][:2]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = parse_command_line(
        TrainConfig,
        [
            "--config",
            str(REPO_ROOT / "configs" / "smollm2_teacher_correction.yaml"),
            "--model.student",
            str(smollm2_gguf),
            "--data.train_file",
            str(data),
            "--output_dir",
            str(tmp_path / "corrected"),
            "--max_steps",
            "3",
            "--warmup_steps",
            "0",
            "--per_device_train_batch_size",
            "2",
            "--logging_steps",
            "1",
            "--data.max_length",
            "96",
        ],
        "distill train",
    )
    assert cfg.model.teacher is None and cfg.loss.terms == {"ce": 1.0}
    result = train(cfg)
    assert result.stopped is None and result.steps == 3
    losses = [
        json.loads(line)["train/ce"]
        for line in (tmp_path / "corrected" / "metrics.jsonl").read_text().splitlines()
        if "train/ce" in line
    ]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    final = tmp_path / "corrected" / "final"
    corrected = AutoModelForCausalLM.from_pretrained(final)  # a plain checkpoint: no gguf_file, not quantized
    tokenizer = AutoTokenizer.from_pretrained(final)
    original, original_tokenizer = smollm2
    assert tokenizer.chat_template == original_tokenizer.chat_template
    ids = tokenizer(rows[0]["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(corrected(ids).logits, original(ids).logits)  # it trained
