"""Structured pruning: choose what to keep (depth, heads/KV groups, MLP channels, hidden channels), then build a
real smaller model of the same transformers class with a consistently rewritten config.

The pruned model is made by slicing every state-dict tensor along the axes that ``families`` labels, renumbering
layers, and loading the result strictly into a freshly constructed model of the teacher's class: a weight the layout
does not explain is an error, never a silently random one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from distill.student.prune.families import Family, head_dim, num_kv_heads
from distill.student.prune.importance import Importance
from kd_core.config import ConfigError


@dataclass
class Targets:
    """Target shape, flat (the command's config sections are copied into it)."""

    num_layers: int | None = None
    depth_method: Literal["block_influence", "uniform", "explicit"] = "block_influence"
    drop_layers: list[int] = field(default_factory=list)
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    hidden_size: int | None = None
    criterion: Literal["activation", "magnitude"] = "activation"

    @property
    def requested(self) -> bool:
        width = (self.num_attention_heads, self.intermediate_size, self.hidden_size)
        return self.num_layers is not None or bool(self.drop_layers) or any(w is not None for w in width)

    @property
    def needs_calibration(self) -> bool:
        width = (self.num_attention_heads, self.intermediate_size, self.hidden_size)
        uses_activation = self.criterion == "activation" and any(w is not None for w in width)
        uses_influence = self.depth_method == "block_influence" and self.num_layers is not None
        return uses_activation or uses_influence


@dataclass
class Plan:
    """What survives, in teacher numbering: kept layers and, per space, the sorted kept channel indices."""

    kept_layers: list[int]
    keep: dict[str, torch.Tensor]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int


def validate_targets(config: PretrainedConfig, family: Family, t: Targets) -> None:
    """ConfigError for any target that cannot be reached, checked before anything is loaded or written."""
    layers, heads, kv = config.num_hidden_layers, config.num_attention_heads, num_kv_heads(config, family)
    if t.depth_method == "explicit":
        if not t.drop_layers:
            raise ConfigError("depth.drop_layers: expected the layers to drop when depth.method is 'explicit'")
        bad = [i for i in t.drop_layers if not 0 <= i < layers]
        if bad or len(set(t.drop_layers)) != len(t.drop_layers):
            raise ConfigError(f"depth.drop_layers: expected distinct indices in 0..{layers - 1}, got {t.drop_layers}")
        if len(t.drop_layers) >= layers:
            raise ConfigError("depth.drop_layers: dropping every layer leaves zero layers")
    elif t.drop_layers:
        raise ConfigError("depth.drop_layers: only used with depth.method 'explicit'")
    if t.num_layers is not None and not 1 <= t.num_layers <= layers:
        raise ConfigError(f"depth.num_layers: expected 1..{layers} (the model has {layers} layers), got {t.num_layers}")
    if t.num_attention_heads is not None:
        group = heads // kv
        if not 1 <= t.num_attention_heads <= heads:
            raise ConfigError(f"width.num_attention_heads: expected 1..{heads}, got {t.num_attention_heads}")
        if t.num_attention_heads % group:
            raise ConfigError(
                f"width.num_attention_heads: {t.num_attention_heads} is not a multiple of the {group} query heads per "
                f"key/value head ({heads} heads, {kv} KV heads); whole KV groups are removed to keep the ratio valid"
            )
    if t.intermediate_size is not None and not 1 <= t.intermediate_size <= config.intermediate_size:
        raise ConfigError(f"width.intermediate_size: expected 1..{config.intermediate_size}, got {t.intermediate_size}")
    if t.hidden_size is not None and not 1 <= t.hidden_size <= config.hidden_size:
        raise ConfigError(f"width.hidden_size: expected 1..{config.hidden_size}, got {t.hidden_size}")
    if not family.explicit_head_dim and (t.num_attention_heads is not None or t.hidden_size is not None):
        # BERT derives the head size as hidden_size / num_attention_heads, so both must shrink together.
        new_heads = t.num_attention_heads or heads
        new_hidden = t.hidden_size or config.hidden_size
        size = head_dim(config, family)
        if new_hidden != new_heads * size:
            raise ConfigError(
                f"width: {family.name} computes head size as hidden_size / num_attention_heads, so pruning heads or "
                f"hidden channels needs hidden_size == num_attention_heads * {size}; got hidden_size={new_hidden}, "
                f"num_attention_heads={new_heads} (e.g. set both to {new_heads * size} and {new_heads})"
            )


def check_target_config(config: PretrainedConfig, family: Family, t: Targets) -> None:
    """Runs transformers' own config validation on the target shape, so a shape that ``save_pretrained`` would
    reject (e.g. LlamaConfig in 5.23 insists on hidden_size % num_attention_heads == 0 even with an explicit
    head_dim) is a ConfigError before any work is done."""
    layers = config.num_hidden_layers - len(t.drop_layers) if t.depth_method == "explicit" else t.num_layers
    heads, kv = config.num_attention_heads, num_kv_heads(config, family)
    new_heads = t.num_attention_heads or heads
    shape = Plan(
        kept_layers=list(range(layers or config.num_hidden_layers)),
        keep={},
        num_attention_heads=new_heads,
        num_key_value_heads=new_heads // (heads // kv),
        head_dim=head_dim(config, family),
        intermediate_size=t.intermediate_size or config.intermediate_size,
        hidden_size=t.hidden_size or config.hidden_size,
    )
    try:
        pruned_config(config, family, shape).validate()
    except (StrictDataclassError, ValueError, TypeError) as err:
        cause = err.__cause__ or err
        raise ConfigError(
            f"width: transformers rejects the target config for {type(config).__name__}: {cause}"
        ) from None


def magnitude_scores(state: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """Per space, the L2 norm of every weight that reads or writes each channel (the layout drives this)."""
    sums: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        axes, _ = family.axes(key)
        for dim, space in enumerate(axes):
            if space is None:
                continue
            other = [d for d in range(tensor.dim()) if d != dim]
            sq = (tensor.float() ** 2).sum(dim=other) if other else tensor.float() ** 2
            sums[space] = sums.get(space, 0) + sq
    return {k: v.sqrt() for k, v in sums.items()}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (so the kept weights keep their layout)."""
    return torch.sort(torch.topk(scores, k).indices).values


def _kept_layers(config: PretrainedConfig, t: Targets, importance: Importance | None) -> list[int]:
    layers = config.num_hidden_layers
    if t.depth_method == "explicit":
        return [i for i in range(layers) if i not in set(t.drop_layers)]
    if t.num_layers is None:
        return list(range(layers))
    if t.depth_method == "uniform":
        # Evenly spaced survivors; the first and last layers are always kept.
        if t.num_layers == 1:
            return [0]
        return sorted({round(i * (layers - 1) / (t.num_layers - 1)) for i in range(t.num_layers)})
    assert importance is not None, "block influence needs calibration statistics"
    return _top(importance.block_influence, t.num_layers).tolist()


def plan_pruning(
    config: PretrainedConfig,
    family: Family,
    t: Targets,
    state: dict[str, torch.Tensor],
    importance: Importance | None,
) -> Plan:
    """Decides what to keep. Importance comes from calibration (activation) or from the weights (magnitude)."""
    scores = importance.channels if t.criterion == "activation" and importance is not None else None
    if scores is None:
        scores = magnitude_scores(state, family)
    kept = _kept_layers(config, t, importance)
    heads, kv, hd = config.num_attention_heads, num_kv_heads(config, family), head_dim(config, family)
    group = heads // kv
    keep: dict[str, torch.Tensor] = {}
    new_heads = t.num_attention_heads or heads
    for i in kept:
        if new_heads < heads:
            per_head = scores[f"q.{i}"].reshape(heads, hd).sum(1)
            per_group = per_head.reshape(kv, group).sum(1)
            if t.criterion == "magnitude" and f"kv.{i}" in scores:
                per_group = per_group + scores[f"kv.{i}"].reshape(kv, hd).sum(1)
            groups = _top(per_group, new_heads // group)
            # Query head h reads KV head h // group (transformers' repeat_kv), so a group is `group` adjacent heads.
            q_heads = (groups[:, None] * group + torch.arange(group)).reshape(-1)
            keep[f"q.{i}"] = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
            if family.grouped_query:
                keep[f"kv.{i}"] = (groups[:, None] * hd + torch.arange(hd)).reshape(-1)
        if t.intermediate_size is not None and t.intermediate_size < config.intermediate_size:
            keep[f"mlp.{i}"] = _top(scores[f"mlp.{i}"], t.intermediate_size)
    if t.hidden_size is not None and t.hidden_size < config.hidden_size:
        keep["hidden"] = _top(scores["hidden"], t.hidden_size)
    return Plan(
        kept_layers=kept,
        keep=keep,
        num_attention_heads=new_heads,
        num_key_value_heads=new_heads // group,
        head_dim=hd,
        intermediate_size=t.intermediate_size or config.intermediate_size,
        hidden_size=t.hidden_size or config.hidden_size,
    )


def prune_state_dict(state: dict[str, torch.Tensor], family: Family, plan: Plan) -> dict[str, torch.Tensor]:
    """Slices every tensor along its labelled axes and renumbers the kept layers 0..n-1."""
    renumber = {old: new for new, old in enumerate(plan.kept_layers)}
    out = {}
    for key, tensor in state.items():
        axes, layer = family.axes(key)
        if layer is not None and layer not in renumber:
            continue
        for dim, space in enumerate(axes):
            if space in plan.keep:
                tensor = tensor.index_select(dim, plan.keep[space])
        if layer is not None:
            rest = key[len(family.layers_prefix) :].partition(".")[2]
            key = f"{family.layers_prefix}{renumber[layer]}.{rest}"
        out[key] = tensor.contiguous().clone()
    return out


def pruned_config(config: PretrainedConfig, family: Family, plan: Plan) -> PretrainedConfig:
    """The teacher's config with every shape field and every per-layer list rewritten for the pruned model."""
    old_layers = config.num_hidden_layers
    new = copy.deepcopy(config)
    for name, value in config.to_dict().items():
        # Per-layer lists (layer_types, ...) lose the entries of dropped layers.
        if "layer" in name and isinstance(value, list) and len(value) == old_layers:
            setattr(new, name, [value[i] for i in plan.kept_layers])
    new.num_hidden_layers = len(plan.kept_layers)
    new.num_attention_heads = plan.num_attention_heads
    new.intermediate_size = plan.intermediate_size
    new.hidden_size = plan.hidden_size
    if family.grouped_query:
        new.num_key_value_heads = plan.num_key_value_heads
    if family.explicit_head_dim:
        # Always explicit: after hidden pruning, hidden_size / num_attention_heads no longer equals head_dim.
        new.head_dim = plan.head_dim
    return new


def build_pruned_model(teacher: PreTrainedModel, family: Family, plan: Plan) -> PreTrainedModel:
    """A new model of the teacher's class and config, holding exactly the kept weights (strict load)."""
    state = prune_state_dict(teacher.state_dict(), family, plan)
    config = pruned_config(teacher.config, family, plan)
    # Built in the teacher's dtype, uninitialised (every weight is replaced below), and given the sliced tensors
    # themselves (assign): no float32 student, no second copy of its weights.
    with no_init_weights():
        student = type(teacher)._from_config(config, dtype=teacher.dtype)
    student.load_state_dict(state, strict=True, assign=True)
    student.tie_weights()
    return student.eval()
