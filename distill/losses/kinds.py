"""The logit divergences, one row each, and the one spec every divergence function takes.

A row (:class:`Divergence`) carries a kind's code: its per-token value from fp32 log-probabilities ``s`` (student)
and ``t`` (teacher) ``[n, V]``, differentiable by autograd (the reference, and the path for full logits), and the
same value with its analytic gradient w.r.t. the (temperature-scaled) student logits, computed in place for the
chunked kernels. Adding a divergence is adding its two functions and a row to :data:`KINDS`; the loss-term registry
(:mod:`distill.losses.registry`) and ``loss.terms`` pick it up from there. The definitions and conventions are in
:mod:`distill.losses.divergences`.

In-place functions: ``s``, ``t`` and the scratch tiles ``w1``/``w2`` (``w2`` only for the rows with ``mixture``)
are OVERWRITTEN: every ``[n, V]`` intermediate lives in one of these four preallocated tiles, because a fresh
multi-MB allocation per op costs page faults that dominate elementwise time on CPU. With ``g = dL/dp_s``, the
softmax Jacobian gives ``dL/dz_s = p_s * (g - <p_s, g>)``; each function is that identity simplified for its kind.
The returned gradient aliases ``s``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

CHUNK_SIZE = 128  # tokens per chunk of every logit kernel unless told otherwise (docs/benchmarks.md: at V 152K, 128
# costs 0.18x the naive peak and is no slower than 256)


def _log(x: float) -> float:
    """``log`` with ``log(0) = -inf``, so a zero-weight mixture component drops out of ``logaddexp`` exactly."""
    return math.log(x) if x > 0 else -math.inf


def log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(weight_p * p + (1 - weight_p) * q) from log-probabilities, without ever exponentiating to zero first."""
    return torch.logaddexp(log_p + _log(weight_p), log_q + _log(1.0 - weight_p))


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim from log-probabilities. An underflowed p contributes exactly 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mixture_into(log_p: Tensor, log_q: Tensor, weight_p: float, out: Tensor, scratch: Tensor) -> Tensor:
    """:func:`log_mixture` written into preallocated ``out`` (``scratch`` is clobbered)."""
    torch.add(log_p, _log(weight_p), out=out)
    torch.add(log_q, _log(1.0 - weight_p), out=scratch)
    return torch.logaddexp(out, scratch, out=out)


def _forward_kl(s: Tensor, t: Tensor, w1: Tensor, w2: Tensor | None, beta: float, skew: float) -> tuple[Tensor, Tensor]:
    # L = <p_t, t - s>;  dL/dz_s = p_s - p_t
    pt = torch.exp(t, out=w1)
    value = t.sub_(s).mul_(pt).sum(-1)
    return value, s.exp_().sub_(pt)


def _reverse_kl(s: Tensor, t: Tensor, w1: Tensor, w2: Tensor | None, beta: float, skew: float) -> tuple[Tensor, Tensor]:
    # L = <p_s, s - t>;  dL/dz_s = p_s * (s - t - L)
    ps = torch.exp(s, out=w1)
    d = s.sub_(t)
    value = torch.mul(ps, d, out=t).sum(-1)
    return value, d.sub_(value[:, None]).mul_(ps)


def _tvd(s: Tensor, t: Tensor, w1: Tensor, w2: Tensor | None, beta: float, skew: float) -> tuple[Tensor, Tensor]:
    # L = 0.5 sum |p_s - p_t|;  g = 0.5 sign(p_s - p_t);  dL/dz_s = p_s * (g - <p_s, g>)
    ps = s.exp_()
    d = t.exp_().neg_().add_(ps)
    value = 0.5 * torch.abs(d, out=w1).sum(-1)
    g = d.sign_().mul_(0.5)
    return value, g.sub_(torch.mul(ps, g, out=w1).sum(-1)[:, None]).mul_(ps)


def _jsd(s: Tensor, t: Tensor, w1: Tensor, w2: Tensor | None, beta: float, skew: float) -> tuple[Tensor, Tensor]:
    # m = beta p_t + (1-beta) p_s;  g = (1-beta)(s - log m) (the 1/m terms cancel)
    # dL/dz_s = (1-beta) p_s * (s - log m - KL(p_s || m))
    if beta in (0.0, 1.0):  # TRL special-cases these: the mixture formula itself tends to 0 there, not to a KL
        return (_forward_kl if beta == 0.0 else _reverse_kl)(s, t, w1, w2, beta, skew)
    log_m = _log_mixture_into(t, s, beta, out=w1, scratch=w2)
    pt = torch.exp(t, out=w2)
    kl_t = t.sub_(log_m).mul_(pt).sum(-1)
    ps = torch.exp(s, out=w2)
    d = s.sub_(log_m)
    kl_s = torch.mul(ps, d, out=t).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s, d.sub_(kl_s[:, None]).mul_(ps).mul_(1.0 - beta)


def _skew_forward_kl(
    s: Tensor, t: Tensor, w1: Tensor, w2: Tensor | None, beta: float, skew: float
) -> tuple[Tensor, Tensor]:
    # m = a p_t + (1-a) p_s, L = <p_t, t - log m>;  g = -w / p_s with w = (1-a) p_s p_t / m
    # dL/dz_s = p_s * sum(w) - w
    log_m = _log_mixture_into(t, s, skew, out=w1, scratch=w2)
    pt = torch.exp(t, out=w2)
    d = t.sub_(log_m)
    value = torch.mul(pt, d, out=w1).sum(-1)
    w = d.add_(s).add_(_log(1.0 - skew)).exp_()
    return value, s.exp_().mul_(w.sum(-1)[:, None]).sub_(w)


def _skew_reverse_kl(
    s: Tensor, t: Tensor, w1: Tensor, w2: Tensor | None, beta: float, skew: float
) -> tuple[Tensor, Tensor]:
    # m = a p_s + (1-a) p_t, L = <p_s, s - log m>;  g = 1 + u with u = s - log m - a p_s / m
    # dL/dz_s = p_s * (u - <p_s, u>)
    log_m = _log_mixture_into(s, t, skew, out=w1, scratch=w2)
    ps = torch.exp(s, out=w2)
    d = s.sub_(log_m)
    value = torch.mul(ps, d, out=t).sum(-1)
    u = d.sub_(torch.add(d, _log(skew), out=w1).exp_())
    return value, u.sub_(torch.mul(ps, u, out=t).sum(-1)[:, None]).mul_(ps)


def _jsd_value(s: Tensor, t: Tensor, beta: float, skew: float) -> Tensor:
    if beta in (0.0, 1.0):  # as in _jsd
        return kl(t, s) if beta == 0.0 else kl(s, t)
    m = log_mixture(t, s, beta)
    return beta * kl(t, m) + (1.0 - beta) * kl(s, m)


Value = Callable[[Tensor, Tensor, float, float], Tensor]
ValueAndGrad = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float, float], "tuple[Tensor, Tensor]"]


@dataclasses.dataclass(frozen=True)
class Divergence:
    """One logit divergence: ``value(s, t, beta, skew)`` per token, and ``value_and_grad(s, t, w1, w2, beta, skew)``
    (in place, see the module docstring); ``mixture``: whether it builds a mixture and needs the tile ``w2``."""

    name: str
    value: Value
    value_and_grad: ValueAndGrad
    mixture: bool = False

    def needs_second_scratch(self, beta: float) -> bool:
        return self.mixture and not (self.name == "jsd" and beta in (0.0, 1.0))


# fmt: off
KINDS: dict[str, Divergence] = {row.name: row for row in (
    Divergence("forward_kl",      lambda s, t, beta, skew: kl(t, s),                         _forward_kl),
    Divergence("reverse_kl",      lambda s, t, beta, skew: kl(s, t),                         _reverse_kl),
    Divergence("jsd",             _jsd_value,                                                _jsd, mixture=True),
    Divergence("skew_forward_kl", lambda s, t, beta, skew: kl(t, log_mixture(t, s, skew)),   _skew_forward_kl,
               mixture=True),
    Divergence("skew_reverse_kl", lambda s, t, beta, skew: kl(s, log_mixture(s, t, skew)),   _skew_reverse_kl,
               mixture=True),
    Divergence("tvd",             lambda s, t, beta, skew: 0.5 * (s.exp() - t.exp()).abs().sum(-1), _tvd),
)}
# fmt: on


@dataclasses.dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence and its coefficients: what every divergence function of :mod:`distill.losses` takes.

    ``temperature`` softens both distributions (values are multiplied by ``T**2``), ``beta`` interpolates the
    generalized JSD, ``skew`` mixes the skew KLs, ``chunk_size`` is the tokens per chunk of the kernels."""

    kind: str
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    chunk_size: int = CHUNK_SIZE

    def __post_init__(self) -> None:
        # Programming errors: configs (loss.*) validate earlier, with field names.
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta: expected 0 <= beta <= 1, got {self.beta}")
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"skew: expected 0 <= skew <= 1, got {self.skew}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {self.chunk_size}")

    @property
    def row(self) -> Divergence:
        return KINDS[self.kind]


def as_spec(kind: str | DivergenceSpec, options: dict[str, float]) -> DivergenceSpec:
    """The spec of a divergence function's call: a :class:`DivergenceSpec`, or a kind name with the spec's other
    fields as keywords (``temperature=``, ``beta=``, ``skew=``, ``chunk_size=``)."""
    if isinstance(kind, DivergenceSpec):
        if options:
            raise TypeError(f"a DivergenceSpec already holds {', '.join(options)}")
        return kind
    return DivergenceSpec(kind, **options)
