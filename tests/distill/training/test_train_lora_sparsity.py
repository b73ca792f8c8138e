"""Training pruned students: sparsity survives optimizer steps and LoRA merges; LoRA exports load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill.training.train import TrainConfig, run
from kd_core.config import from_dict


@pytest.fixture(scope="module")
def sparse_student(tmp_path_factory, model_dirs, tokenizer):
    """The tiny student with half of every linear weight in its layers zeroed (smallest magnitudes)."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["student"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and param.dim() == 2:
                threshold = param.abs().flatten().kthvalue(param.numel() // 2).values
                param.mul_(param.abs() > threshold)
    path = tmp_path_factory.mktemp("sparse") / "student"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_config(model_dirs, student, train_file, out, **extra) -> TrainConfig:
    tree = {
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "eval_steps": None,
        "report_to": ["none"],
        "model": {"teacher": str(model_dirs["teacher"]), "student": str(student)},
        "data": {"train_file": str(train_file), "eval_fraction": 0.0},
        "loss": {"terms": {"forward_kl": 1.0}},
        **extra,
    }
    return from_dict(TrainConfig, tree)


def zero_positions(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v == 0 for k, v in state.items() if ".layers." in k and v.dim() == 2}


def test_full_training_keeps_the_zero_pattern(model_dirs, sparse_student, train_file, tmp_path):
    before = zero_positions(load_file(str(sparse_student / "model.safetensors")))
    run(make_config(model_dirs, sparse_student, train_file, tmp_path / "run"))
    after_state = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    after = zero_positions(after_state)
    for name, zeros in before.items():
        assert torch.equal(after[name], zeros), name  # exactly the same entries are zero
    untouched = load_file(str(sparse_student / "model.safetensors"))
    assert any(not torch.equal(after_state[k], untouched[k]) for k in before), "training changed nothing"


def test_without_keep_sparsity_training_densifies(model_dirs, sparse_student, train_file, tmp_path):
    """The control for the test above: the masks are what keeps the zeros."""
    before = zero_positions(load_file(str(sparse_student / "model.safetensors")))
    run(make_config(model_dirs, sparse_student, train_file, tmp_path / "run", keep_sparsity=False))
    after = zero_positions(load_file(str(tmp_path / "run" / "final" / "model.safetensors")))
    assert sum(int(after[k].sum()) for k in before) < sum(int(z.sum()) for z in before.values())


def test_lora_on_sparse_student_exports_adapter_and_sparse_merge(model_dirs, sparse_student, train_file, tmp_path):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    out = tmp_path / "lora"
    run(make_config(model_dirs, sparse_student, train_file, out, lora=lora))
    assert (out / "final" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    before = zero_positions(load_file(str(sparse_student / "model.safetensors")))
    merged_zeros = zero_positions(merged.state_dict())
    for name, zeros in before.items():
        assert torch.equal(merged_zeros[name] & zeros, zeros), name  # every pruned zero is still zero

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(sparse_student)
    adapted = PeftModel.from_pretrained(base, out / "final" / "adapter")
    assert any("lora_" in name for name, _ in adapted.named_parameters())
