"""Settings of training memory: gradient checkpointing (non-reentrant, also with LoRA) recomputes the student's
layers in the backward pass and changes neither the loss nor a gradient; attention kernels are checked against what
is installed; the teacher loads in bf16 on a GPU."""

from __future__ import annotations

import pytest
import torch

from distill.student.lora import LoraSettings, apply_lora
from distill.student.models import ModelSettings, check_paths, installed_attention, load_student, teacher_dtype
from kd_core.config import ConfigError


def loss_grads_and_saved(model) -> tuple[float, dict[str, torch.Tensor], int]:
    """The loss, the gradients and how many values autograd kept from the forward pass for the backward."""
    saved = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    model.train()
    ids = torch.tensor([[3, 17, 45, 9, 81, 6, 22, 5] * 4, [7, 7, 12, 90, 4, 31, 2, 8] * 4])
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, sum(saved)


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_recomputes_and_keeps_loss_and_gradients(model_dirs, lora):
    results = []
    for checkpointing in (False, True):
        settings = ModelSettings(student=str(model_dirs["student"]), gradient_checkpointing=checkpointing)
        model = load_student(settings, seed=0)
        model.config.attention_dropout = 0.0
        if lora:
            torch.manual_seed(1)  # the adapters' random initialisation, the same for both models
            model = apply_lora(model, LoraSettings(enabled=True, r=4, dropout=0.0))
            with torch.no_grad():  # LoRA's B starts at zero: make the adapters matter for the A gradients
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.1)
        results.append(loss_grads_and_saved(model))
    (loss, grads, saved), (loss_ckpt, grads_ckpt, saved_ckpt) = results
    assert saved_ckpt < 0.3 * saved  # the layers' activations are recomputed in the backward pass, not kept
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    assert all(g.abs().sum() > 0 for n, g in grads_ckpt.items() if "lora_A" in n)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6)


def test_attention_kernels_are_checked_against_what_is_installed(model_dirs):
    assert {"sdpa", "eager"} <= set(installed_attention())
    for name in installed_attention():
        check_paths(ModelSettings(teacher=str(model_dirs["teacher"]), attn_implementation=name))
    if "flash_attention_2" not in installed_attention():
        with pytest.raises(ConfigError, match="model.attn_implementation: 'flash_attention_2' cannot run here"):
            check_paths(ModelSettings(teacher=str(model_dirs["teacher"]), attn_implementation="flash_attention_2"))


def test_teacher_loads_in_bf16_on_a_gpu_by_default(monkeypatch):
    settings = ModelSettings(teacher="t")
    assert teacher_dtype(settings, bf16=False) == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert teacher_dtype(settings, bf16=True) == torch.bfloat16
    assert teacher_dtype(ModelSettings(teacher="t", teacher_dtype="float32"), bf16=True) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert teacher_dtype(settings, bf16=False) == torch.bfloat16
