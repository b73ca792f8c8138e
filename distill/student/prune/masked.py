"""The teacher with the pruned structures masked out in place: the reference a pruned model must reproduce.

What is exactly equal (up to float rounding) to the pruned model:

- dropped layers: skipped by a forward hook that returns the layer's input;
- removed heads / KV groups and MLP channels: the corresponding input columns of the attention output projection and
  the MLP down projection are zeroed (and the q/k/v or gate/up rows, which then no longer matter);
- removed hidden channels (decoders with RMSNorm only): every weight touching those channels is zeroed, which keeps
  them at zero along the whole residual stream. RMSNorm then averages over all ``d`` channels instead of the ``d'``
  kept ones, so each hidden RMSNorm also gets its weight scaled by ``sqrt(d'/d)`` and its epsilon by ``d'/d``; with
  that correction ``x * w / sqrt(mean_d(x^2) + eps)`` equals the pruned ``x * w / sqrt(mean_d'(x^2) + eps)``.
  LayerNorm (BERT) also subtracts a mean over all channels, which zeros cannot reproduce, so there is no exact
  masked equivalent for BERT hidden pruning and :func:`mask_teacher` refuses it.
"""

from __future__ import annotations

import math
import re

import torch
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from distill.student.prune.families import Family
from distill.student.prune.structured import Plan


def mask_teacher(model: PreTrainedModel, family: Family, plan: Plan) -> list[RemovableHandle]:
    """Masks ``model`` in place as described above; returns the layer-skipping hook handles."""
    if "hidden" in plan.keep and not family.explicit_head_dim:
        raise ValueError(f"{family.name}: LayerNorm has no exact masked equivalent for hidden-channel pruning")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in params.items():
            axes, _ = family.axes(key)
            for dim, space in enumerate(axes):
                if space in plan.keep:
                    removed = torch.ones(tensor.shape[dim], dtype=torch.bool)
                    removed[plan.keep[space]] = False
                    tensor.index_fill_(dim, removed.nonzero().squeeze(1), 0.0)
        if "hidden" in plan.keep:
            ratio = len(plan.keep["hidden"]) / model.config.hidden_size
            for name, module in model.named_modules():
                if re.fullmatch(family.norm_modules, name):
                    module.weight.mul_(math.sqrt(ratio))
                    module.variance_epsilon *= ratio  # LlamaRMSNorm-style attribute (Llama/Qwen/Mistral, 5.23)
    handles = []
    layers = model.get_submodule(family.layers_prefix.rstrip("."))
    for i, layer in enumerate(layers):
        if i not in plan.kept_layers:
            # Decoder and BERT layers take hidden_states first, positionally, and return a tensor (5.23).
            handles.append(layer.register_forward_hook(lambda _m, args, _out: args[0]))
    return handles
