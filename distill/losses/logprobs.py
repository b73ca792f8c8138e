"""Log-probabilities of given tokens from hidden states, a chunk of rows at a time.

What on-policy training logs about its samples (the student's mean log-probability per sampled token) needs one
number per token, not ``[batch, new tokens, vocabulary]`` logits: each chunk of ``chunk_size`` rows is projected
through the head into one fp32 ``[chunk, V]`` tile, reduced to ``logit[target] - logsumexp(logits)`` and
overwritten by the next chunk. The projection is the kernels' own (:func:`distill.losses.head.project_into`), through
the model's own head (bias, scaling, soft-capping: :class:`~distill.losses.head.OutputHead`), as in the loss terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses.head import OutputHead, as_head, matmul_head, project_into
from distill.losses.kinds import CHUNK_SIZE


def chunked_token_logprobs(
    hidden: Tensor, head: Tensor | OutputHead, targets: Tensor, chunk_size: int = CHUNK_SIZE
) -> Tensor:
    """``log softmax(head(hidden))[i, targets[i]]`` for each row ``i`` of ``hidden`` [N, H] (T = 1), fp32 [N],
    without gradients; ``head`` an :class:`OutputHead` or a bare lm_head weight; working memory one fp32
    ``[chunk_size, V]`` tile."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    n_tokens = hidden.shape[0]
    out = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    if n_tokens == 0:
        return out
    with torch.no_grad():
        head = as_head(head)
        weight = matmul_head(head.weight)
        tile = torch.empty((min(chunk_size, n_tokens), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            rows = hidden[start : start + chunk_size]
            z = project_into(tile[: rows.shape[0]], rows, weight, head, 1.0)
            chosen = z.gather(1, targets[start : start + chunk_size, None]).squeeze(1)
            out[start : start + rows.shape[0]] = chosen - torch.logsumexp(z, dim=-1)
    return out
