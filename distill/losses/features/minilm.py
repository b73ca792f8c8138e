"""MiniLM self-attention relation transfer, and the hooks that capture queries, keys and values.

MiniLM (Wang et al. 2020) transfers, at one teacher layer and one student layer, the attention distributions and
the value-value relation ``softmax(V V^T / sqrt(d))``. MiniLMv2 (Wang et al. 2021) drops the attention maps and
transfers query-query, key-key and value-value relations computed with *relation heads*: the concatenated heads are
re-split into the same number of heads on both sides, so student and teacher may differ in width and head count.

Hugging Face outputs do not include queries, keys or values, so :class:`QKVCapture` records the outputs of the
projection layers with forward hooks. For Llama-family decoders these are taken before rotary embeddings (the
relation then compares content, not content mixed with position, which is the same for both models).
"""

from __future__ import annotations

import math
import re

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from distill.losses.features.attention import attention_transfer
from distill.losses.features.masking import kl_rows, masked_log_softmax, masked_mean, upcast
from kd_core.config import ConfigError

# Module names of the q/k/v projections of layer N, by architecture. Anchored at the end so a peft LoRA wrapper's
# inner ``q_proj.base_layer`` is not matched: the wrapper's own output (base + LoRA delta) is the effective one.
_PROJECTION_PATTERNS = (
    (
        re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)$"),
        {"q_proj": "q", "k_proj": "k", "v_proj": "v"},
    ),
    (
        re.compile(r"(?:^|\.)layer\.(\d+)\.attention\.self\.(query|key|value)$"),
        {"query": "q", "key": "k", "value": "v"},
    ),
)


def find_projections(model: nn.Module, layer: int) -> dict[str, nn.Linear]:
    """The ``{"q", "k", "v"}`` projection modules of transformer layer ``layer`` (Llama/Qwen2/Mistral or BERT)."""
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        for pattern, kinds in _PROJECTION_PATTERNS:
            match = pattern.search(name)
            if match and int(match.group(1)) == layer:
                found[kinds[match.group(2)]] = module
    if set(found) != {"q", "k", "v"}:
        raise ConfigError(
            f"MiniLM losses: could not find the query/key/value projections of layer {layer} in "
            f"{type(model).__name__} (supported: Llama/Qwen2/Mistral self_attn.q_proj/k_proj/v_proj, "
            "BERT attention.self.query/key/value)"
        )
    return found


class QKVCapture:
    """Forward hooks that keep the latest q/k/v projection outputs ``(batch, seq, width)`` of one layer."""

    def __init__(self) -> None:
        self.outputs: dict[str, Tensor] = {}
        self.handles: list[RemovableHandle] = []

    def attach(self, model: nn.Module, layer: int, kinds: tuple[str, ...]) -> dict[str, int]:
        """Hooks the projections named in ``kinds``; returns their output widths (for validation)."""
        projections = find_projections(model, layer)
        widths = {}
        for kind in kinds:
            module = projections[kind]
            self.handles.append(module.register_forward_hook(self._recorder(kind)))
            widths[kind] = module.out_features
        return widths

    def _recorder(self, kind: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.outputs[kind] = output

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.outputs.clear()


def relation_log_probs(x: Tensor, mask: Tensor, heads: int) -> Tensor:
    """``log softmax(X_h X_h^T / sqrt(d_r))`` per relation head -> ``(batch, heads, seq, seq)``, padded keys out."""
    batch, seq, width = x.shape
    head_width = width // heads
    split = upcast(x).view(batch, seq, heads, head_width).transpose(1, 2)
    scores = split @ split.transpose(-1, -2) / math.sqrt(head_width)
    return masked_log_softmax(scores, mask[:, None, None, :])


def relation_kl(student: Tensor, teacher: Tensor, mask: Tensor, heads: int) -> Tensor:
    """KL(teacher relation || student relation), averaged over relation heads and real query rows."""
    keys = mask[:, None, None, :]
    per_row = kl_rows(
        relation_log_probs(teacher, mask, heads),
        relation_log_probs(student, mask, heads),
        keys.expand(-1, heads, mask.shape[1], -1),
    )
    return masked_mean(per_row, mask[:, None, :])


def minilm_v2(student_qkv: dict[str, Tensor], teacher_qkv: dict[str, Tensor], mask: Tensor, heads: int) -> Tensor:
    """MiniLMv2: sum of the query-query, key-key and value-value relation KLs."""
    return sum(relation_kl(student_qkv[k], teacher_qkv[k], mask, heads) for k in ("q", "k", "v"))


def minilm_v1(
    student_attention: Tensor,
    teacher_attention: Tensor,
    student_value: Tensor,
    teacher_value: Tensor,
    mask: Tensor,
    heads: int,
    head_map: list[int] | str,
) -> Tensor:
    """MiniLM: attention-distribution KL plus value-value relation KL (with ``heads`` relation heads)."""
    attention = attention_transfer(student_attention, teacher_attention, mask, "kl", head_map)
    return attention + relation_kl(student_value, teacher_value, mask, heads)
