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

:func:`chunked_divergence` computes the same per-token values from hidden states and lm_head weights, a chunk of
tokens at a time, together with the analytic gradient with respect to the student logits, so neither model's full
``[N, V]`` logits ever exist and backward needs no recomputation. See ``docs/losses.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.losses.registry import DIVERGENCES
from kd_core.config import ConfigError


def _check(kind: str, temperature: float, beta: float, skew: float) -> None:
    """Rejects unknown kinds and out-of-range coefficients (programming errors: configs validate earlier)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"kind: expected one of {', '.join(DIVERGENCES)}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected 0 <= beta <= 1, got {beta}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew: expected 0 <= skew <= 1, got {skew}")


def _log(x: float) -> float:
    """``log`` with ``log(0) = -inf``, so a zero-weight mixture component drops out of ``logaddexp`` exactly."""
    return math.log(x) if x > 0 else -math.inf


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(weight_p * p + (1 - weight_p) * q) from log-probabilities, without ever exponentiating to zero first."""
    return torch.logaddexp(log_p + _log(weight_p), log_q + _log(1.0 - weight_p))


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim from log-probabilities. An underflowed p contributes exactly 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """Per-token divergence ``[...]`` of logits ``[..., V]``, already multiplied by ``temperature**2``.

    Differentiable by autograd with respect to both inputs; the teacher is usually passed detached.
    """
    _check(kind, temperature, beta, skew)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logits: student {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()  # no-op for fp32 inputs
    if temperature != 1.0:  # skipping the division at T = 1 saves a full [..., V] copy per model
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    s = F.log_softmax(student_logits, dim=-1)
    t = F.log_softmax(teacher_logits, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        value = _kl(t, s)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        # TRL special-cases beta in {0, 1}: the mixture formula itself tends to 0 there, not to a KL.
        value = _kl(s, t)
    elif kind == "jsd":
        m = _log_mixture(t, s, beta)
        value = beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    elif kind == "skew_forward_kl":
        value = _kl(t, _log_mixture(t, s, skew))
    elif kind == "skew_reverse_kl":
        value = _kl(s, _log_mixture(s, t, skew))
    else:  # tvd
        value = 0.5 * (s.exp() - t.exp()).abs().sum(-1)
    return value * temperature**2


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean over unmasked tokens of :func:`per_token_divergence` (0 with a live graph when no token counts).

    logits ``[..., V]``; mask ``[...]`` bool, True = counted.
    """
    values = per_token_divergence(student_logits, teacher_logits, kind, temperature=temperature, beta=beta, skew=skew)
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask: expected shape {tuple(values.shape)}, got {tuple(mask.shape)}")
    # where() instead of indexing keeps the shape static; clamp avoids 0/0 when everything is masked.
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def _log_mixture_into(log_p: Tensor, log_q: Tensor, weight_p: float, out: Tensor, scratch: Tensor) -> Tensor:
    """:func:`_log_mixture` written into preallocated ``out`` (``scratch`` is clobbered)."""
    torch.add(log_p, _log(weight_p), out=out)
    torch.add(log_q, _log(1.0 - weight_p), out=scratch)
    return torch.logaddexp(out, scratch, out=out)


def divergence_and_grad(
    s: Tensor, t: Tensor, w1: Tensor, w2: Tensor | None, kind: str, beta: float, skew: float
) -> tuple[Tensor, Tensor]:
    """Per-row divergence and its gradient w.r.t. the (temperature-scaled) student logits ``z_s``.

    ``s`` and ``t`` are fp32 log-probabilities ``[n, V]``; they and the scratch tiles ``w1``/``w2`` (``w2`` only
    for the mixture kinds) are OVERWRITTEN: every ``[n, V]`` intermediate lives in one of these four preallocated
    tiles, because a fresh multi-MB allocation per op costs page faults that dominate elementwise time on CPU.
    With ``g = dL/dp_s``, the softmax Jacobian gives ``dL/dz_s = p_s * (g - <p_s, g>)``; each branch below is that
    identity simplified for its kind. The returned gradient aliases ``s``.
    """
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "forward_kl":
        # L = <p_t, t - s>;  dL/dz_s = p_s - p_t
        pt = torch.exp(t, out=w1)
        value = t.sub_(s).mul_(pt).sum(-1)
        return value, s.exp_().sub_(pt)
    if kind == "reverse_kl":
        # L = <p_s, s - t>;  dL/dz_s = p_s * (s - t - L)
        ps = torch.exp(s, out=w1)
        d = s.sub_(t)
        value = torch.mul(ps, d, out=t).sum(-1)
        return value, d.sub_(value[:, None]).mul_(ps)
    if kind == "tvd":
        # L = 0.5 sum |p_s - p_t|;  g = 0.5 sign(p_s - p_t);  dL/dz_s = p_s * (g - <p_s, g>)
        ps = s.exp_()
        d = t.exp_().neg_().add_(ps)
        value = 0.5 * torch.abs(d, out=w1).sum(-1)
        g = d.sign_().mul_(0.5)
        return value, g.sub_(torch.mul(ps, g, out=w1).sum(-1)[:, None]).mul_(ps)
    assert w2 is not None, "mixture kinds need a second scratch tile"
    if kind == "jsd":
        # m = beta p_t + (1-beta) p_s;  g = (1-beta)(s - log m) (the 1/m terms cancel)
        # dL/dz_s = (1-beta) p_s * (s - log m - KL(p_s || m))
        log_m = _log_mixture_into(t, s, beta, out=w1, scratch=w2)
        pt = torch.exp(t, out=w2)
        kl_t = t.sub_(log_m).mul_(pt).sum(-1)
        ps = torch.exp(s, out=w2)
        d = s.sub_(log_m)
        kl_s = torch.mul(ps, d, out=t).sum(-1)
        return beta * kl_t + (1.0 - beta) * kl_s, d.sub_(kl_s[:, None]).mul_(ps).mul_(1.0 - beta)
    if kind == "skew_forward_kl":
        # m = a p_t + (1-a) p_s, L = <p_t, t - log m>;  g = -w / p_s with w = (1-a) p_s p_t / m
        # dL/dz_s = p_s * sum(w) - w
        log_m = _log_mixture_into(t, s, skew, out=w1, scratch=w2)
        pt = torch.exp(t, out=w2)
        d = t.sub_(log_m)
        value = torch.mul(pt, d, out=w1).sum(-1)
        w = d.add_(s).add_(_log(1.0 - skew)).exp_()
        return value, s.exp_().mul_(w.sum(-1)[:, None]).sub_(w)
    # skew_reverse_kl: m = a p_s + (1-a) p_t, L = <p_s, s - log m>;  g = 1 + u with u = s - log m - a p_s / m
    # dL/dz_s = p_s * (u - <p_s, u>)
    log_m = _log_mixture_into(s, t, skew, out=w1, scratch=w2)
    ps = torch.exp(s, out=w2)
    d = s.sub_(log_m)
    value = torch.mul(ps, d, out=t).sum(-1)
    u = d.sub_(torch.add(d, _log(skew), out=w1).exp_())
    return value, u.sub_(torch.mul(ps, u, out=t).sum(-1)[:, None]).mul_(ps)


def matmul_head(head: Tensor) -> Tensor:
    """The head as the kernels multiply with it: cast once to autocast's dtype when autocast is on (bf16 mixed
    precision), as the model's own lm_head matmuls would run, instead of in fp32 or cast again for every chunk.
    Only the products run in it: log-softmax, divergences and the gradient accumulators stay fp32."""
    device = head.device.type
    if torch.is_autocast_enabled(device) and head.dtype == torch.float32:
        return head.to(torch.get_autocast_dtype(device))
    return head


def project_into(out: Tensor, hidden: Tensor, head: Tensor, inv_t: float) -> Tensor:
    """``out = (hidden @ head.T) / T`` in fp32. Low-precision inputs are projected in their own dtype first
    (what the model's own lm_head would output), then upcast."""
    if hidden.dtype == torch.float32 and head.dtype == torch.float32:
        torch.mm(hidden, head.t(), out=out)
    else:
        out.copy_(hidden @ head.t())
    return out.mul_(inv_t) if inv_t != 1.0 else out


def gradient_accumulators(
    ctx: torch.autograd.function.FunctionCtx, hidden: Tensor, head: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Zeroed fp32 gradients for a kernel's ``hidden`` and (full-size) ``head`` inputs, where autograd wants them.

    fp32 because bf16 sums over many chunks would lose the small per-chunk contributions; the head's is full-size
    (padding rows stay 0) so that autograd receives it without a copy."""
    grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
    grad_head = torch.zeros_like(head, dtype=torch.float32) if ctx.needs_input_grad[1] else None
    return grad_hidden, grad_head


def hold_gradients(
    ctx: torch.autograd.function.FunctionCtx, grads: tuple[Tensor | None, Tensor | None],
    dtypes: tuple[torch.dtype, torch.dtype],
) -> None:
    """Keep a kernel's finished gradients for :func:`release_gradients`, with the dtypes of the inputs (the
    parameters' own: the head may have been multiplied in autocast's dtype).

    Kept as ctx attributes, not save_for_backward: backward hands these very tensors to autograd, and a tensor still
    referenced by a SavedVariable would be cloned by AccumulateGrad (one more [V, H] copy)."""
    ctx.grads = list(grads)
    ctx.dtypes = dtypes


def needs_mixture_scratch(kind: str, beta: float) -> bool:
    """Whether :func:`divergence_and_grad` needs its second scratch tile (the kinds that build a mixture)."""
    return kind in ("jsd", "skew_forward_kl", "skew_reverse_kl") and not (kind == "jsd" and beta in (0, 1))


HEAD_SLICE = 8192  # vocabulary rows per low-precision head-gradient product (8192 x 4096 in bf16: 64 MiB)


def backprop_chunk(
    grad_z: Tensor, hidden: Tensor, head: Tensor, grad_hidden: Tensor | None, grad_head: Tensor | None, start: int
) -> None:
    """Through ``logits = hidden @ head.T`` for one chunk of rows starting at ``start``: write the hidden-state
    gradient rows and add to the (full-size, fp32) head gradient. ``head`` is already cropped to ``grad_z``'s width."""
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
        for v in range(0, grad_z.shape[1], HEAD_SLICE):
            grad_head[v : v + HEAD_SLICE].add_(grad_z[:, v : v + HEAD_SLICE].t() @ hidden)


class _ChunkedDivergence(torch.autograd.Function):
    """Sum of per-token divergences from hidden states; gradients are computed in forward, backward only scales.

    Inputs are restricted to the counted tokens; the heads are cropped to ``vocab`` rows here. The teacher arrives
    detached and backward returns None for it, so no graph is ever built on its side.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        student_hidden: Tensor,
        student_head: Tensor,
        teacher_hidden: Tensor,
        teacher_head: Tensor,
        kind: str,
        temperature: float,
        beta: float,
        skew: float,
        chunk_size: int,
        vocab: int,
    ) -> Tensor:
        n_tokens = student_hidden.shape[0]
        device = student_hidden.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_hidden, grad_head = gradient_accumulators(ctx, student_hidden, student_head)
        dtypes = (student_hidden.dtype, student_head.dtype)
        # Cropping inside the Function, not before it: a slice taken outside would make autograd scatter our
        # gradient into a fresh zero [V, H] tensor (SliceBackward), a second head-sized copy at peak.
        student_head, teacher_head = matmul_head(student_head[:vocab]), matmul_head(teacher_head[:vocab])
        rows = min(chunk_size, n_tokens)
        mixture = needs_mixture_scratch(kind, beta)
        tiles = [torch.empty((rows, vocab), dtype=torch.float32, device=device) for _ in range(4 if mixture else 3)]
        inv_t = 1.0 / temperature
        with torch.no_grad():
            for start in range(0, n_tokens, chunk_size):
                h_s = student_hidden[start : start + chunk_size]
                n = h_s.shape[0]
                s, t, w1 = (tile[:n] for tile in tiles[:3])
                w2 = tiles[3][:n] if mixture else None
                # log_softmax is one fused kernel that reads each row before writing it, so it may run in place
                # (checked on CPU with torch 2.13 by the parity tests); this saves a tile per model.
                s = torch.log_softmax(project_into(s, h_s, student_head, inv_t), -1, out=s)
                z_t = project_into(t, teacher_hidden[start : start + chunk_size], teacher_head, inv_t)
                t = torch.log_softmax(z_t, -1, out=t)
                value, grad_z = divergence_and_grad(s, t, w1, w2, kind, beta, skew)
                total += value.sum()
                # d(T^2 L)/d(logits) = T^2 * (1/T) * dL/dz
                if temperature != 1.0:
                    grad_z.mul_(temperature)
                backprop_chunk(grad_z, h_s, student_head, grad_hidden, grad_head, start)
        del tiles
        hold_gradients(ctx, (grad_hidden, grad_head), dtypes)
        return total * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*release_gradients(ctx, grad_output), *(None,) * 8)


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
        head: Tensor,
        targets: Tensor,
        weights: Tensor | None,
        chunk_size: int,
    ) -> Tensor:
        grad_hidden, grad_head = gradient_accumulators(ctx, hidden, head)
        dtypes = (hidden.dtype, head.dtype)
        head = matmul_head(head)
        n_tokens = hidden.shape[0]
        tile = torch.empty((min(chunk_size, n_tokens), head.shape[0]), dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, n_tokens, chunk_size):
                h, target = hidden[start : start + chunk_size], targets[start : start + chunk_size, None]
                log_p = torch.log_softmax(project_into(tile[: h.shape[0]], h, head, 1.0), -1, out=tile[: h.shape[0]])
                nll = log_p.gather(1, target).neg_().squeeze(1)
                grad_z = log_p.exp_().scatter_add_(1, target, torch.full_like(nll, -1.0)[:, None])
                if weights is not None:
                    w = weights[start : start + chunk_size].float()
                    nll, grad_z = nll * w, grad_z.mul_(w[:, None])
                total += nll.sum()
                backprop_chunk(grad_z, h, head, grad_hidden, grad_head, start)
        hold_gradients(ctx, (grad_hidden, grad_head), dtypes)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*release_gradients(ctx, grad_output), None, None, None)


def chunked_cross_entropy_sum(
    hidden: Tensor, head: Tensor, targets: Tensor, chunk_size: int, token_weights: Tensor | None = None
) -> Tensor:
    """Sum over tokens of the cross-entropy of ``hidden [N, H] @ head.T`` against ``targets [N]``, each times its
    weight if given, ``chunk_size`` tokens at a time (full logits never exist, nothing is recomputed in backward).
    The trainer divides by the counted tokens, not by the weights, so weights of 1 give exactly the unweighted loss
    and a weighted step does not depend on how it is split into micro-batches."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    weights = None if token_weights is None else token_weights.detach()
    return _ChunkedCrossEntropy.apply(hidden, head, targets, weights, chunk_size)


def chunked_divergence(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    kind: str,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """SUM over unmasked tokens of the per-token divergence, computed ``chunk_size`` tokens at a time.

    The caller divides by the global number of counted tokens, so gradient accumulation and data parallelism
    normalise correctly. ``student_hidden [N, Hs]`` (after the final norm), ``student_head [Vs, Hs]`` (lm_head
    weight), ``teacher_hidden [N, Ht]``, ``teacher_head [Vt, Ht]``; ``vocab_size`` crops both heads to their first
    ``vocab_size`` rows (padding rows). Differentiable w.r.t. ``student_hidden`` and ``student_head`` only.
    Working memory: 3 fp32 ``[chunk_size, V]`` tiles (4 for the mixture kinds) plus the fp32 head gradient.
    The default ``chunk_size`` keeps the agreed signature; at V ~ 152K use 128-256 (see docs/benchmarks.md).
    """
    _check(kind, temperature, beta, skew)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"hidden: expected [N, H] for both models, got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if vocab_size is None:
        if student_head.shape[0] != teacher_head.shape[0]:
            raise ValueError(
                f"vocab_size: heads have {student_head.shape[0]} and {teacher_head.shape[0]} rows; pass vocab_size "
                "(see shared_vocab_size)"
            )
        vocab_size = student_head.shape[0]
    if vocab_size > min(student_head.shape[0], teacher_head.shape[0]):
        raise ValueError(f"vocab_size: {vocab_size} exceeds a head ({student_head.shape[0]}, {teacher_head.shape[0]})")
    s_hidden, t_hidden = student_hidden, teacher_hidden.detach()
    if mask is not None:
        mask = mask.reshape(-1)
        if mask.shape[0] != student_hidden.shape[0]:
            raise ValueError(f"mask: expected {student_hidden.shape[0]} entries, got {mask.shape[0]}")
        # Masked tokens (prompts, padding) are skipped entirely rather than computed and zeroed.
        rows = mask.nonzero().squeeze(1)
        s_hidden, t_hidden = s_hidden.index_select(0, rows), t_hidden.index_select(0, rows)
    return _ChunkedDivergence.apply(
        s_hidden,
        student_head,
        t_hidden,
        teacher_head.detach(),
        kind,
        float(temperature),
        float(beta),
        float(skew),
        chunk_size,
        vocab_size,
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
