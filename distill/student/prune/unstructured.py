"""Unstructured and N:M sparsity as masks on a dense model (the pruned weights are stored as exact zeros).

Scores: ``magnitude`` = |W|; ``wanda`` = |W| * ||X_j||_2, the weight times the L2 norm of its input column over the
calibration tokens (Sun et al., 2023). Targets are the linear layers inside the transformer blocks; embeddings and
the LM head stay dense. Which weights compete with each other:

- unstructured ``wanda``: within each output row (as in the paper), the lowest ``ratio`` of every row is removed;
- unstructured ``magnitude``: within the whole matrix (classic magnitude pruning);
- ``N:M`` (either score): within every group of M consecutive input weights of a row, the M - N lowest are removed.

Counts are exact: ties are broken by position, never by a threshold that could remove more or fewer weights.
Scores use the dense teacher's activations (one-shot), not the layer-by-layer re-calibration of the Wanda paper.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.student.prune.families import Family
from kd_core.config import ConfigError


def target_linears(model: PreTrainedModel, family: Family) -> dict[str, nn.Linear]:
    """Linear layers inside the blocks, by full module name."""
    layers = model.get_submodule(family.layers_prefix.rstrip("."))
    return {
        f"{family.layers_prefix}{i}.{name}": module
        for i, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4); ConfigError unless 0 < N < M."""
    n_text, sep, m_text = pattern.partition(":")
    if not sep or not n_text.isdigit() or not m_text.isdigit() or not 0 < int(n_text) < int(m_text):
        raise ConfigError(f"sparsity.pattern: expected 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return int(n_text), int(m_text)


def scores(weight: torch.Tensor, method: str, input_sq_norm: torch.Tensor | None) -> torch.Tensor:
    if method == "magnitude":
        return weight.abs().float()
    assert input_sq_norm is not None, "wanda needs calibration input norms"
    return weight.abs().float() * input_sq_norm.sqrt()[None, :]


def keep_mask(score: torch.Tensor, method: str, ratio: float | None, n_m: tuple[int, int] | None) -> torch.Tensor:
    """Boolean keep-mask of the same shape as ``score``."""
    rows, cols = score.shape
    if n_m is not None:
        n, m = n_m
        groups = score.reshape(rows, cols // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
        return keep.reshape(rows, cols)
    assert ratio is not None
    if method == "wanda":  # per output row
        drop = int(cols * ratio)
        keep = torch.ones_like(score, dtype=torch.bool)
        keep.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :drop], False)
        return keep
    drop = int(score.numel() * ratio)
    keep = torch.ones(score.numel(), dtype=torch.bool)
    keep[torch.argsort(score.reshape(-1), stable=True)[:drop]] = False
    return keep.reshape(rows, cols)


def sparsify(
    model: PreTrainedModel,
    family: Family,
    method: str,
    ratio: float | None,
    pattern: str | None,
    input_sq_norms: dict[str, torch.Tensor] | None,
) -> dict[str, float]:
    """Zeros weights in place; returns the resulting sparsity of each target weight (``name.weight`` -> fraction)."""
    n_m = parse_pattern(pattern) if pattern else None
    linears = target_linears(model, family)
    if n_m is not None:
        bad = [name for name, lin in linears.items() if lin.in_features % n_m[1]]
        if bad:
            raise ConfigError(f"sparsity.pattern: in_features of {bad[0]} is not a multiple of M={n_m[1]}")
    result = {}
    with torch.no_grad():
        for name, linear in linears.items():
            norms = input_sq_norms[name] if input_sq_norms is not None else None
            mask = keep_mask(scores(linear.weight, method, norms), method, ratio, n_m)
            linear.weight.mul_(mask.to(linear.weight.dtype))
            result[f"{name}.weight"] = float((linear.weight == 0).float().mean())
    return result
