"""``prune_report.json`` and the table printed at the end of ``distill prune``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from distill.student.prune.families import Family, head_dim, num_kv_heads
from kd_core.atomic import atomic_write_json

SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


def shape_summary(config: PretrainedConfig, family: Family) -> dict[str, int]:
    out = {name: int(getattr(config, name)) for name in SHAPE_FIELDS}
    out["num_key_value_heads"] = num_kv_heads(config, family)
    out["head_dim"] = head_dim(config, family)
    return out


def count_params(model: PreTrainedModel) -> int:
    """Distinct parameters (a tied embedding is counted once)."""
    return sum(p.numel() for p in model.parameters())


def zero_fraction(model: PreTrainedModel) -> float:
    total = zeros = 0
    for p in model.parameters():
        total += p.numel()
        zeros += int((p == 0).sum())
    return zeros / max(total, 1)


def layer_rows(model: PreTrainedModel, family: Family, teacher_index: list[int]) -> list[dict[str, Any]]:
    """Per layer: its teacher index, each weight's shape and the fraction of zeros in the layer."""
    layers = model.get_submodule(family.layers_prefix.rstrip("."))
    rows = []
    for i, layer in enumerate(layers):
        params = dict(layer.named_parameters())
        zeros = sum(int((p == 0).sum()) for p in params.values())
        total = sum(p.numel() for p in params.values())
        rows.append(
            {
                "index": i,
                "teacher_index": teacher_index[i],
                "params": total,
                "sparsity": zeros / max(total, 1),
                "shapes": {name: list(p.shape) for name, p in params.items() if name.endswith("weight")},
            }
        )
    return rows


def write_report(path: Path, report: dict[str, Any]) -> None:
    atomic_write_json(path, report, indent=2, trailing_newline=True)


def format_table(report: dict[str, Any]) -> str:
    """A plain-text summary: totals, then one line per layer."""
    before, after = report["params_before"], report["params_after"]
    lines = [
        f"params: {before:,} -> {after:,} ({after / before:.1%}); overall zeros {report['sparsity']:.1%}",
        f"shape: {report['config_before']} -> {report['config_after']}",
    ]
    calibration = report["calibration"]
    if calibration:
        lines.append(
            f"calibration: {calibration['num_samples']} samples, {calibration['num_tokens']} tokens "
            f"(max_length {calibration['max_length']}); criterion {report['criterion']}"
        )
    lines.append(f"{'layer':>5} {'teacher':>7} {'params':>12} {'zeros':>7}  weights")
    for row in report["layers"]:
        shapes = ", ".join(f"{name.rsplit('.', 2)[-2]}{tuple(shape)}" for name, shape in row["shapes"].items())
        lines.append(
            f"{row['index']:>5} {row['teacher_index']:>7} {row['params']:>12,} {row['sparsity']:>7.1%}  {shapes}"
        )
    return "\n".join(lines)


def tensor_list(values: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in values]
