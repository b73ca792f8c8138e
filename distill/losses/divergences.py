"""Logit-based distillation divergences and a memory-efficient chunked kernel.

Every divergence compares the teacher distribution ``p_t`` with the student distribution ``p_s`` over the next
token, both softened by a temperature ``T``: ``p = softmax(logits / T)``. Per-token values are multiplied by
``T**2`` (Hinton et al.) so the gradient magnitude does not shrink as ``T`` grows. All KL terms are the full KL,
teacher-entropy term included (torchtune's ``ForwardKLLoss`` drops it; its gradient is the same, its value is not).

Kinds (``m`` is a mixture distribution):

- ``forward_kl``       KL(p_t || p_s)
- ``reverse_kl``       KL(p_s || p_t)
- ``jsd``              beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s
                       (TRL's GKD convention; beta = 0 is exactly forward KL, beta = 1 exactly reverse KL)
- ``skew_forward_kl``  KL(p_t || skew * p_t + (1 - skew) * p_s)      (DistiLLM)
- ``skew_reverse_kl``  KL(p_s || skew * p_s + (1 - skew) * p_t)      (DistiLLM)
- ``tvd``              0.5 * sum |p_t - p_s|

Numerics: everything is computed in fp32 from log-probabilities (``log_softmax``, ``logaddexp``), never from the
log of a probability, so underflowing probabilities give exact zeros instead of ``0 * -inf = NaN``. Logits are
assumed finite.

:func:`chunked_divergence` computes the same per-token values from hidden states through each model's own output
head (:mod:`distill.losses.head`), a chunk of tokens at a time, together with the analytic gradient with respect to
the student's hidden states and head, so neither model's full ``[N, V]`` logits ever exist and backward needs no
recomputation. The kinds' code is in :mod:`distill.losses.kinds`, one row each. See ``docs/losses.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.losses.head import OutputHead, as_head, chain_head, matmul_head, project_into, slope_tile
from distill.losses.kinds import CHUNK_SIZE, DivergenceSpec, as_spec
from kd_core.config import ConfigError


def per_token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, kind: str | DivergenceSpec, **options: float
) -> Tensor:
    """Per-token divergence ``[...]`` of logits ``[..., V]``, already multiplied by ``temperature**2``.

    ``kind``: a :class:`~distill.losses.kinds.DivergenceSpec`, or a kind name with the spec's other fields as
    keywords. Differentiable by autograd with respect to both inputs; the teacher is usually passed detached.
    """
    spec = as_spec(kind, options)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logits: student {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()  # no-op for fp32 inputs
    temperature = spec.temperature
    if temperature != 1.0:  # skipping the division at T = 1 saves a full [..., V] copy per model
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    s = F.log_softmax(student_logits, dim=-1)
    t = F.log_softmax(teacher_logits, dim=-1)
    return spec.row.value(s, t, spec.beta, spec.skew) * temperature**2


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str | DivergenceSpec,
    *,
    mask: Tensor | None = None,
    **options: float,
) -> Tensor:
    """Mean over unmasked tokens of :func:`per_token_divergence` (0 with a live graph when no token counts).

    logits ``[..., V]``; mask ``[...]`` bool, True = counted.
    """
    values = per_token_divergence(student_logits, teacher_logits, kind, **options)
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask: expected shape {tuple(values.shape)}, got {tuple(mask.shape)}")
    # where() instead of indexing keeps the shape static; clamp avoids 0/0 when everything is masked.
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def gradient_accumulators(
    ctx: torch.autograd.function.FunctionCtx, hidden: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Zeroed fp32 gradients for a kernel's ``hidden``, (full-size) head ``weight`` and ``bias`` inputs (its first
    three), where autograd wants them.

    fp32 because bf16 sums over many chunks would lose the small per-chunk contributions; the head's is full-size
    (padding rows stay 0) so that autograd receives it without a copy."""
    grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
    return grad_hidden, grad_weight, grad_bias


def hold_gradients(
    ctx: torch.autograd.function.FunctionCtx, grads: tuple[Tensor | None, ...], inputs: tuple[Tensor | None, ...]
) -> None:
    """Keep a kernel's finished gradients for :func:`release_gradients`, with the dtypes of the inputs (the
    parameters' own: the head may have been multiplied in autocast's dtype).

    Kept as ctx attributes, not save_for_backward: backward hands these very tensors to autograd, and a tensor still
    referenced by a SavedVariable would be cloned by AccumulateGrad (one more [V, H] copy)."""
    ctx.grads = list(grads)
    ctx.dtypes = [None if x is None else x.dtype for x in inputs]


HEAD_SLICE = 8192  # vocabulary rows per low-precision head-gradient product (8192 x 4096 in bf16: 64 MiB)


def backprop_chunk(
    grad_z: Tensor,
    hidden: Tensor,
    head: Tensor,
    grad_hidden: Tensor | None,
    grad_head: Tensor | None,
    start: int,
    grad_bias: Tensor | None = None,
) -> None:
    """Through ``logits = hidden @ head.T + bias`` for one chunk of rows starting at ``start``: write the
    hidden-state gradient rows and add to the (full-size, fp32) head weight and bias gradients. ``head`` is already
    cropped to ``grad_z``'s width; ``grad_z`` is w.r.t. that linear part (:func:`~distill.losses.head.chain_head`)."""
    if grad_bias is not None:
        grad_bias[: grad_z.shape[1]].add_(grad_z.sum(0))
    if head.dtype == torch.float32:
        if grad_hidden is not None:
            torch.mm(grad_z, head, out=grad_hidden[start : start + grad_z.shape[0]])
        if grad_head is not None:
            grad_head[: grad_z.shape[1]].addmm_(grad_z.t(), hidden.float())
        return
    # The products in the head's (autocast) dtype, summed into fp32; grad_z cast once for both.
    grad_z = grad_z.to(head.dtype)
    if grad_hidden is not None:
        grad_hidden[start : start + grad_z.shape[0]].copy_(grad_z @ head)
    if grad_head is not None:
        hidden = hidden.to(head.dtype)
        # addmm_ wants one dtype (torch 2.13's mm(out_dtype=) has no CPU kernel), so each product is a temporary:
        # taken HEAD_SLICE vocabulary rows at a time, it never is a second [V, H] tensor at the peak.
        vocab = grad_z.shape[1]  # the cropped vocabulary: grad_head may have more (padding) rows than that
        for v in range(0, vocab, HEAD_SLICE):
            end = min(v + HEAD_SLICE, vocab)
            grad_head[v:end].add_(grad_z[:, v:end].t() @ hidden)


# The per-chunk rule of a two-model kernel: value [n] and d(value)/d(z_s / T) from the fp32 log-probabilities
# s [n, Vs] and t [n, Vt] (which it may overwrite) and its scratch tiles [n, Vs].
PairRule = Callable[[Tensor, Tensor, list[Tensor]], tuple[Tensor, Tensor]]


def pair_chunks(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[Tensor, Tensor, Tensor | None],
    teacher_hidden: Tensor,
    heads: tuple[OutputHead, OutputHead],
    spec: DivergenceSpec,
    vocabs: tuple[int, int],
    scratch: int,
    rule: PairRule,
) -> Tensor:
    """The forward of a kernel comparing two models' heads (:class:`_ChunkedDivergence`, and the cross-tokenizer
    one): ``spec.chunk_size`` rows at a time, each head's logits ``/ T`` in a preallocated fp32 tile, log-softmaxed,
    ``rule`` applied, its gradient taken back through the student's head into the accumulators; returns the sum
    times ``T**2`` and holds the gradients for :func:`release_gradients`.

    ``inputs`` are the student's hidden states ``[N, Hs]``, head weight and bias; the heads are cropped to
    ``vocabs`` (student, teacher) rows here, inside the Function: a slice taken outside would make autograd scatter
    our gradient into a fresh zero ``[V, H]`` tensor (SliceBackward), a second head-sized copy at peak."""
    student_hidden, student_weight, _ = inputs
    n_tokens, chunk, temperature = student_hidden.shape[0], spec.chunk_size, spec.temperature
    device = student_hidden.device
    total = torch.zeros((), dtype=torch.float32, device=device)
    grads = gradient_accumulators(ctx, *inputs)
    student_head, teacher_head = heads
    s_weight = matmul_head(student_weight[: vocabs[0]])
    t_weight = matmul_head(teacher_head.weight.detach()[: vocabs[1]])
    rows = min(chunk, n_tokens)
    s_tile, t_tile, *scratch_tiles = (
        torch.empty((rows, vocab), dtype=torch.float32, device=device) for vocab in (*vocabs, *(vocabs[0],) * scratch)
    )
    slope_rows = slope_tile(student_head, rows, vocabs[0], device)
    inv_t = 1.0 / temperature
    with torch.no_grad():
        for start in range(0, n_tokens, chunk):
            h_s = student_hidden[start : start + chunk]
            n = h_s.shape[0]
            slope = None if slope_rows is None else slope_rows[:n]
            # log_softmax is one fused kernel that reads each row before writing it, so it may run in place
            # (checked on CPU with torch 2.13 by the parity tests); this saves a tile per model.
            z_s = project_into(s_tile[:n], h_s, s_weight, student_head, inv_t, slope)
            s = torch.log_softmax(z_s, -1, out=s_tile[:n])
            z_t = project_into(t_tile[:n], teacher_hidden[start : start + chunk], t_weight, teacher_head, inv_t)
            t = torch.log_softmax(z_t, -1, out=t_tile[:n])
            value, grad_z = rule(s, t, [tile[:n] for tile in scratch_tiles])
            total += value.sum()
            grad_z = chain_head(grad_z, student_head, slope, temperature)  # d(T^2 L)/dz = T dL/d(z/T)
            backprop_chunk(grad_z, h_s, s_weight, grads[0], grads[1], start, grads[2])
    del s_tile, t_tile, scratch_tiles, slope_rows
    hold_gradients(ctx, grads, inputs)
    return total * temperature**2


class _ChunkedDivergence(torch.autograd.Function):
    """Sum of per-token divergences from hidden states; gradients are computed in forward, backward only scales.

    Inputs are restricted to the counted tokens; the heads are cropped to ``vocab`` rows (:func:`pair_chunks`). The
    teacher arrives detached and backward returns None for it, so no graph is ever built on its side. Each model's
    logits go through its own :class:`~distill.losses.head.OutputHead` (``heads``; its weight and bias are also
    passed as inputs, for autograd).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        heads: tuple[OutputHead, OutputHead],
        spec: DivergenceSpec,
        vocab: int,
    ) -> Tensor:
        mixture = spec.row.needs_second_scratch(spec.beta)

        def rule(s: Tensor, t: Tensor, scratch: list[Tensor]) -> tuple[Tensor, Tensor]:
            return spec.row.value_and_grad(s, t, scratch[0], scratch[1] if mixture else None, spec.beta, spec.skew)

        inputs = (student_hidden, student_weight, student_bias)
        return pair_chunks(ctx, inputs, teacher_hidden, heads, spec, (vocab, vocab), 2 if mixture else 1, rule)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*release_gradients(ctx, grad_output), *(None,) * 4)


def release_gradients(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> list[Tensor | None]:
    """Backward of a kernel that computed its input gradients in forward (``ctx.grads``, fp32, with ``ctx.dtypes``
    of the inputs): scale them by the upstream gradient, in place, and hand them over once."""
    if ctx.grads is None:
        raise RuntimeError("chunked kernel: backward called twice (retain_graph is not supported)")
    grads, ctx.grads = ctx.grads, None
    scale = grad_output.float()
    return [None if grad is None else grad.mul_(scale).to(dtype) for grad, dtype in zip(grads, ctx.dtypes)]


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of (weighted) token cross-entropies from hidden states, gradient computed in forward as above: one fp32
    ``[chunk, V]`` tile holds the log-probabilities, then ``w * (softmax - one_hot)``; backward only scales."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        head: OutputHead,
        targets: Tensor,
        weights: Tensor | None,
        chunk_size: int,
    ) -> Tensor:
        grads = gradient_accumulators(ctx, hidden, weight, bias)
        inputs = (hidden, weight, bias)
        cast = matmul_head(weight)
        n_tokens, rows = hidden.shape[0], min(chunk_size, hidden.shape[0])
        tile = torch.empty((rows, cast.shape[0]), dtype=torch.float32, device=hidden.device)
        slope_rows = slope_tile(head, rows, cast.shape[0], hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, n_tokens, chunk_size):
                h, target = hidden[start : start + chunk_size], targets[start : start + chunk_size, None]
                z, slope = tile[: h.shape[0]], None if slope_rows is None else slope_rows[: h.shape[0]]
                log_p = torch.log_softmax(project_into(z, h, cast, head, 1.0, slope), -1, out=z)
                nll = log_p.gather(1, target).neg_().squeeze(1)
                grad_z = log_p.exp_().scatter_add_(1, target, torch.full_like(nll, -1.0)[:, None])
                if weights is not None:
                    w = weights[start : start + chunk_size].float()
                    nll, grad_z = nll * w, grad_z.mul_(w[:, None])
                total += nll.sum()
                backprop_chunk(chain_head(grad_z, head, slope), h, cast, grads[0], grads[1], start, grads[2])
        hold_gradients(ctx, grads, inputs)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*release_gradients(ctx, grad_output), None, None, None, None)


def chunked_cross_entropy_sum(
    hidden: Tensor,
    head: Tensor | OutputHead,
    targets: Tensor,
    chunk_size: int = CHUNK_SIZE,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Sum over tokens of the cross-entropy of ``head(hidden [N, H])`` (an :class:`~distill.losses.head.OutputHead`,
    or a bare lm_head weight) against ``targets [N]``, each times its weight if given, ``chunk_size`` tokens at a
    time (full logits never exist, nothing is recomputed in backward). The trainer divides by the counted tokens,
    not by the weights, so weights of 1 give exactly the unweighted loss and a weighted step does not depend on how
    it is split into micro-batches."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    weights = None if token_weights is None else token_weights.detach()
    head = as_head(head)
    return _ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, head, targets, weights, chunk_size)


def chunked_divergence(
    student_hidden: Tensor,
    student_head: Tensor | OutputHead,
    teacher_hidden: Tensor,
    teacher_head: Tensor | OutputHead,
    kind: str | DivergenceSpec,
    *,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    **options: float,
) -> Tensor:
    """SUM over unmasked tokens of the per-token divergence, computed ``chunk_size`` tokens at a time.

    The caller divides by the global number of counted tokens, so gradient accumulation and data parallelism
    normalise correctly. ``student_hidden [N, Hs]`` (after the final norm), ``student_head`` (its
    :class:`~distill.losses.head.OutputHead`, or a bare ``[Vs, Hs]`` lm_head weight), ``teacher_hidden [N, Ht]``,
    ``teacher_head`` likewise; ``vocab_size`` crops both heads to their first ``vocab_size`` rows (padding rows).
    Differentiable w.r.t. ``student_hidden`` and the student head's weight and bias only.
    ``kind``: a :class:`~distill.losses.kinds.DivergenceSpec`, or a kind name with the spec's other fields as
    keywords (its ``chunk_size`` is the tokens per chunk). Working memory: 3 fp32 ``[chunk_size, V]`` tiles (4 for
    the mixture kinds, one more for a soft-capped student head) plus the fp32 head gradient.
    """
    spec = as_spec(kind, options)
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"hidden: expected [N, H] for both models, got {tuple(student_hidden.shape)} and "
            f"{tuple(teacher_hidden.shape)}"
        )
    student_head, teacher_head = as_head(student_head), as_head(teacher_head)
    rows_s, rows_t = student_head.weight.shape[0], teacher_head.weight.shape[0]
    if vocab_size is None:
        if rows_s != rows_t:
            raise ValueError(
                f"vocab_size: heads have {rows_s} and {rows_t} rows; pass vocab_size (see shared_vocab_size)"
            )
        vocab_size = rows_s
    if vocab_size > min(rows_s, rows_t):
        raise ValueError(f"vocab_size: {vocab_size} exceeds a head ({rows_s}, {rows_t})")
    s_hidden, t_hidden = student_hidden, teacher_hidden.detach()
    if mask is not None:
        mask = mask.reshape(-1)
        if mask.shape[0] != student_hidden.shape[0]:
            raise ValueError(f"mask: expected {student_hidden.shape[0]} entries, got {mask.shape[0]}")
        # Masked tokens (prompts, padding) are skipped entirely rather than computed and zeroed.
        rows = mask.nonzero().squeeze(1)
        s_hidden, t_hidden = s_hidden.index_select(0, rows), t_hidden.index_select(0, rows)
    return _ChunkedDivergence.apply(
        s_hidden, student_head.weight, student_head.bias, t_hidden, (student_head, teacher_head), spec, vocab_size
    )


def shared_vocab_size(student_vocab: int, teacher_vocab: int, tokenizer_len: int) -> int:
    """The vocabulary both heads share: the tokenizer length, when each head only adds padding rows beyond it.

    Qwen2 checkpoints pad lm_head to a multiple of 128 (e.g. 151,936 vs 152,064 rows for one 151,665-token
    tokenizer); the rows past ``len(tokenizer)`` are never produced by the tokenizer, so cropping both heads to it
    compares like with like. A tokenizer longer than a head means the models do not share it: ConfigError.
    """
    if tokenizer_len > student_vocab or tokenizer_len > teacher_vocab:
        raise ConfigError(
            f"vocabulary mismatch: the tokenizer has {tokenizer_len} tokens but the student head has {student_vocab} "
            f"rows and the teacher head {teacher_vocab}; logit distillation needs a tokenizer shared by both models"
        )
    return tokenizer_len
