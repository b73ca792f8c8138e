"""Sparsity masks: exact N:M patterns, exact unstructured counts, Wanda and magnitude choosing differently."""

from __future__ import annotations

import pytest
import torch

from distill.student.prune.calibration import Calibration
from distill.student.prune.families import family_for
from distill.student.prune.importance import collect_importance
from distill.student.prune.unstructured import keep_mask, parse_pattern, scores, sparsify, target_linears
from distill.student.tiny import tiny_qwen2
from kd_core.config import ConfigError


def _model_and_norms() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_qwen2(300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64).eval()
    model.config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(3)
    ids = torch.randint(3, 300, (4, 12))
    importance = collect_importance(model, family_for(model.config), Calibration(ids, torch.ones_like(ids), "r", 48), 4)
    return model, importance.input_sq_norms


def test_two_four_pattern_is_exact() -> None:
    model, norms = _model_and_norms()
    family = family_for(model.config)
    sparsify(model, family, "wanda", None, "2:4", norms)
    for name, linear in target_linears(model, family).items():
        groups = (linear.weight != 0).reshape(linear.out_features, -1, 4).sum(-1)
        assert torch.equal(groups, torch.full_like(groups, 2)), name  # exactly 2 of every 4, in every group
    assert (model.model.embed_tokens.weight != 0).float().mean() > 0.99  # embeddings stay dense


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_unstructured_counts_are_exact(method: str) -> None:
    model, norms = _model_and_norms()
    family = family_for(model.config)
    result = sparsify(model, family, method, 0.3, None, norms)
    for name, linear in target_linears(model, family).items():
        zeros = int((linear.weight == 0).sum())
        if method == "wanda":  # per output row
            assert zeros == linear.out_features * int(linear.in_features * 0.3), name
        else:
            assert zeros == int(linear.weight.numel() * 0.3), name
        assert result[f"{name}.weight"] == pytest.approx(zeros / linear.weight.numel())


def test_wanda_and_magnitude_choose_different_weights() -> None:
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    input_sq = torch.tensor([100.0, 100.0, 1.0, 0.01])  # the large weights see tiny inputs
    by_magnitude = keep_mask(scores(weight, "magnitude", None), "magnitude", None, (2, 4))
    by_wanda = keep_mask(scores(weight, "wanda", input_sq), "wanda", None, (2, 4))
    assert by_magnitude.tolist() == [[False, False, True, True]]
    assert by_wanda.tolist() == [[True, True, False, False]]
    # And on a real model with calibration norms the two masks differ too.
    model, norms = _model_and_norms()
    family = family_for(model.config)
    name, linear = next(iter(target_linears(model, family).items()))
    w = linear.weight.detach()
    assert not torch.equal(
        keep_mask(scores(w, "wanda", norms[name]), "wanda", 0.5, None),
        keep_mask(scores(w, "magnitude", None), "wanda", 0.5, None),
    )


@pytest.mark.parametrize("bad", ["4:2", "2-4", "0:4", "a:b"])
def test_bad_pattern(bad: str) -> None:
    with pytest.raises(ConfigError, match="sparsity.pattern"):
        parse_pattern(bad)
