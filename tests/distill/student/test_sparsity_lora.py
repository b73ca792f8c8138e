"""Sparsity masks survive optimizer steps (plain and peft models); LoRA merges keep zeros; LoRA exports load."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from distill.student.lora import LoraSettings, apply_lora, export_lora, merge_lora
from distill.student.prune.families import family_for
from distill.student.prune.unstructured import sparsify
from distill.student.sparsity import SparsityCallback, SparsityMasks, canonical_name
from distill.student.tiny import tiny_llama
from kd_core.config import ConfigError, from_dict


def _sparse_model() -> torch.nn.Module:
    model = tiny_llama(300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model.config.architectures = ["LlamaForCausalLM"]
    sparsify(model, family_for(model.config), "magnitude", None, "2:4", None)
    return model


def _train(model: torch.nn.Module, masks: SparsityMasks, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    masks.attach(optimizer, model)
    torch.manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, 300, (2, 10))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_masks_preserved_after_optimizer_steps_plain_model() -> None:
    model = _sparse_model()
    masks = SparsityMasks.capture(model)
    assert len(masks) == 14  # 7 linears x 2 layers; embeddings and lm_head are dense
    zeros_before = sum(int((p == 0).sum()) for p in model.parameters())
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    _train(model, masks)
    assert masks.violations(model) == 0
    assert sum(int((p == 0).sum()) for p in model.parameters()) == zeros_before  # exactly preserved
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)  # and the weights did train


def test_without_masks_training_densifies() -> None:
    model = _sparse_model()
    masks = SparsityMasks.capture(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 300, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert masks.violations(model) > 0  # the check above is not vacuous


def test_masks_on_peft_model_with_full_training_modules() -> None:
    model = _sparse_model()
    masks = SparsityMasks.capture(model)  # captured before wrapping
    peft_model = apply_lora(
        model, LoraSettings(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["down_proj"])
    )
    assert (
        canonical_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        == "model.layers.0.self_attn.q_proj.weight"
    )
    # Captured after wrapping: the same masks (the all-zero LoRA B matrices are not model weights).
    assert SparsityMasks.capture(peft_model).masks.keys() == masks.masks.keys()
    _train(peft_model, SparsityMasks.capture(peft_model))
    assert masks.violations(peft_model) == 0
    lora_b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # the adapter did learn


def test_callback_reapplies_masks() -> None:
    model = _sparse_model()
    masks = SparsityMasks(SparsityMasks.capture(model).masks)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert masks.violations(model) > 0
    SparsityCallback(masks).on_optimizer_step(None, None, None, model=model)  # type: ignore[arg-type]
    assert masks.violations(model) == 0


def test_merge_keeps_zeros_and_refuses_to_densify(tmp_path, tokenizer) -> None:
    model = _sparse_model()
    zeros = {n: int((p == 0).sum()) for n, p in model.named_parameters()}
    peft_model = apply_lora(model, LoraSettings(r=4, target_modules=["all-linear"]))
    with torch.no_grad():  # a trained adapter: B != 0, so B @ A is dense
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    with pytest.raises(ValueError, match="would densify"):
        merge_lora(peft_model, reapply_masks=False)
    out = export_lora(peft_model, tmp_path / "merged", merged=True, tokenizer=tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(out)
    after = {n: int((p == 0).sum()) for n, p in merged.named_parameters()}
    assert after == zeros
    assert (out / "tokenizer.json").is_file()


def test_merge_dense_model_merges(tokenizer) -> None:
    model = tiny_llama(300, hidden_size=32, num_layers=1, num_heads=4)
    peft_model = apply_lora(model, LoraSettings(r=4, target_modules=["q_proj"])).eval()  # eval: no LoRA dropout
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    ids = torch.randint(3, 300, (1, 6))
    expected = peft_model(input_ids=ids).logits
    merged = merge_lora(peft_model, reapply_masks=False)  # dense: nothing to refuse
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_train_norms_and_embeddings_and_adapter_export(tmp_path) -> None:
    model = tiny_llama(300, hidden_size=32, num_layers=2, num_heads=4)
    settings = LoraSettings(r=4, target_modules=["q_proj"], train_norms=True, train_embeddings=True)
    peft_model = apply_lora(model, settings).eval()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("input_layernorm.modules_to_save" in n for n in trainable)
    assert any("model.norm.modules_to_save" in n for n in trainable)
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    assert not any("mlp.up_proj" in n for n in trainable)
    out = export_lora(peft_model, tmp_path / "adapter", merged=False)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_llama(300, hidden_size=32, num_layers=2, num_heads=4), out)
    ids = torch.randint(3, 300, (1, 5))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    with pytest.raises(FileExistsError):
        export_lora(peft_model, out, merged=False)


def test_lora_settings_validate_as_config_section() -> None:
    assert from_dict(LoraSettings, {"r": 8, "train_norms": True}).r == 8
    with pytest.raises(ConfigError, match="r: expected a positive rank"):
        from_dict(LoraSettings, {"r": 0})
