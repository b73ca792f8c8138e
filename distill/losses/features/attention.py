"""Attention transfer (TinyBERT): match the attention probabilities of mapped layers.

Attention probabilities only exist on the eager attention path: transformers 5.23's sdpa and flash kernels never
materialise them and return no ``attentions`` (sdpa logs a warning and gives an empty tuple). The eager path keeps
a ``(batch, heads, seq, seq)`` tensor per layer alive for backward, so memory grows with ``seq^2`` per layer and
step time rises on long sequences; that is the price of this term.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PretrainedConfig

from distill.losses.features.masking import kl_rows, masked_mean, upcast
from kd_core.config import ConfigError

# Attention implementations whose forward returns the probabilities (transformers 5.23: only the eager path).
ATTENTION_IMPLEMENTATIONS_WITH_WEIGHTS = ("eager",)


def check_attention_implementation(config: PretrainedConfig, who: str, terms: list[str]) -> None:
    """Raises ConfigError when ``config`` selects an attention kernel that cannot return attention maps."""
    implementation = config._attn_implementation
    if implementation is not None and implementation not in ATTENTION_IMPLEMENTATIONS_WITH_WEIGHTS:
        raise ConfigError(
            f"{', '.join(terms)} need the {who}'s attention probabilities, but its attention implementation is "
            f"{implementation!r}, which cannot return them; set attn_implementation: eager for the {who}"
        )


def match_heads(student: Tensor, teacher: Tensor, head_map: list[int] | str) -> tuple[Tensor, Tensor]:
    """Makes ``(batch, heads, seq, seq)`` maps comparable head by head.

    An explicit ``head_map`` gives, for each student head, the teacher head it learns from. ``"average"``
    compares head by head when the counts agree and otherwise averages all heads on each side into one map
    (a head's role is not tied to its index, so averaging is the assumption-free choice).
    """
    if isinstance(head_map, list):
        return student, teacher[:, head_map]
    if student.shape[1] == teacher.shape[1]:
        return student, teacher
    return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)


def attention_transfer(
    student: Tensor, teacher: Tensor, mask: Tensor, loss: str, head_map: list[int] | str = "average"
) -> Tensor:
    """Attention-map loss for one layer pair, over real query rows (and real key columns for MSE).

    ``kl``: KL(teacher || student) of each query row's distribution (MiniLM), averaged over heads and real rows.
    ``mse``: squared difference of probabilities, averaged over heads, real rows and real columns (TinyBERT
    uses unnormalised scores; probabilities are what HF returns and they are bounded, so the scale is stable).
    """
    student, teacher = match_heads(upcast(student), upcast(teacher), head_map)
    rows = mask[:, None, :, None]  # (batch, 1, query, 1)
    keys = mask[:, None, None, :]  # (batch, 1, 1, key)
    if loss == "mse":
        return masked_mean((student - teacher).pow(2), rows & keys)
    if loss == "kl":
        tiny = torch.finfo(student.dtype).tiny  # a probability that underflowed to 0 must not give log(0)
        per_row = kl_rows(teacher.clamp_min(tiny).log(), student.clamp_min(tiny).log(), keys.expand_as(student))
        return masked_mean(per_row, rows.squeeze(-1))
    raise ValueError(f"attention_loss: expected 'mse' or 'kl', got {loss!r}")
