"""The real SmolLM2-135M-Instruct GGUF file as a prune source: loaded as a plain model, pruned by depth (Block
Influence), MLP width and whole KV groups; the masked teacher and the pruned model give the same logits; the pruned
model saved by ``distill prune`` reloads with ``from_pretrained`` and gives the same logits again."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from distill.student.prune.calibration import load_calibration
from distill.student.prune.command import PruneConfig
from distill.student.prune.command import run as prune
from distill.student.prune.families import family_for
from distill.student.prune.importance import collect_importance
from distill.student.prune.masked import mask_teacher
from distill.student.prune.structured import Targets, build_pruned_model, plan_pruning
from kd_core.config import from_dict
from tests.conftest import FIXTURES

# 30 -> 16 layers, MLP 1536 -> 1024, 9 query / 3 KV heads -> 6 / 2 (a whole KV group removed).
SHAPE = {"num_layers": 16, "intermediate_size": 1024, "num_attention_heads": 6}
CALIBRATION = {"num_samples": 8, "max_length": 64, "min_tokens": 8}


def test_the_gguf_file_loads_as_a_plain_llama_that_saves(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert type(model) is LlamaForCausalLM and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config") and model.config.architectures == ["LlamaForCausalLM"]
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_prune_the_gguf_by_depth_width_and_kv_groups(smollm2, smollm2_gguf, tmp_path):
    model, tokenizer = smollm2
    family = family_for(model.config)
    calibration = load_calibration(FIXTURES / "real_text.jsonl", tokenizer, **CALIBRATION)
    importance = collect_importance(model, family, calibration, batch_size=4)
    plan = plan_pruning(model.config, family, Targets(**SHAPE), model.state_dict(), importance)
    pruned = build_pruned_model(model, family, plan).eval()
    reference = copy.deepcopy(model)
    mask_teacher(reference, family, plan)
    ids = torch.tensor([tokenizer("Tom has 12 apples and gives 5 away, so he has")["input_ids"]])
    with torch.no_grad():
        expected, got = reference(ids).logits, pruned(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert pruned.config.num_hidden_layers == 16 and pruned.config.num_key_value_heads == 2
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())

    # The command on the .gguf path: same plan from the same calibration, a real directory that reloads.
    out = tmp_path / "pruned"
    cfg = from_dict(
        PruneConfig,
        {
            "model": str(smollm2_gguf),
            "output_dir": str(out),
            "cache_dir": str(tmp_path / "cache"),
            "depth": {"num_layers": SHAPE["num_layers"]},
            "width": {
                "intermediate_size": SHAPE["intermediate_size"],
                "num_attention_heads": SHAPE["num_attention_heads"],
            },
            "calibration": {"data": str(FIXTURES / "real_text.jsonl"), "batch_size": 4, **CALIBRATION},
        },
    )
    report = prune(cfg)
    assert report["params_after"] == sum(p.numel() for p in pruned.parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, got, atol=2e-4, rtol=1e-4)
