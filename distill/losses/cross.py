"""Divergences between two models with different tokenizers, at aligned positions: ULD and GOLD, chunked.

The two models are compared where both predict the continuation of the same text (the pairs of positions come from
:mod:`distill.data.cross`); their distributions live on different vocabularies, ``p_s`` over ``Vs`` student tokens and
``p_t`` over ``Vt`` teacher tokens, both ``softmax(logits / T)`` of each model's own output head.

- ``uld`` (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"):
  ``sum_k |sort(p_s)_k - sort(p_t)_k|``, both probability vectors sorted in decreasing order and the shorter padded
  with zeros. It needs no correspondence between tokens, and compares only the shapes of the two distributions.
- ``gold``: for the tokens whose strings map one to one between the vocabularies (a :class:`VocabMatch`, ``K``
  pairs), the exact divergence ``loss.terms`` names (forward KL, JSD, ...) between the two distributions over those
  ``K`` tokens plus one bucket holding all the other tokens' mass (so both sides stay normalised, as the top-k store's
  tail bucket does); plus the ULD term above over the remaining tokens (their probabilities as they are, sorted, the
  shorter side padded with zeros). With no token matched this is exactly ``uld`` (the bucket holds all the mass on
  both sides and the exact part is 0), which is how ``uld`` is computed: one definition, two matches.

As every divergence of :mod:`distill.losses.divergences`, values are multiplied by ``T**2``. The kernel computes the
gradient with respect to the student's logits in its forward pass, a chunk of aligned positions at a time: one fp32
``[chunk, Vs]`` and one ``[chunk, Vt]`` logit tile plus the sort's values and indices (a handful of tiles of each
width), never ``[tokens, V]`` of either model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.losses.divergences import pair_chunks, release_gradients
from distill.losses.head import OutputHead, as_head
from distill.losses.kinds import DivergenceSpec

# The log-probability of an empty bucket (one side matched every token): finite, as the kinds' code assumes, and
# exp() of it is exactly 0 in fp32.
EMPTY_LOG = -1.0e4


@dataclasses.dataclass(frozen=True)
class VocabMatch:
    """Student ids ``student[i]`` and teacher ids ``teacher[i]`` that are the same string (``gold``; empty for ``uld``),
    the vocabulary each head is cropped to, and the complement of each side (``*_rest``, sorted ids)."""

    student: Tensor  # [K] long
    teacher: Tensor  # [K] long
    student_vocab: int
    teacher_vocab: int
    student_rest: Tensor  # [Vs - K] long
    teacher_rest: Tensor  # [Vt - K] long

    @classmethod
    def build(
        cls, student: Tensor | list[int], teacher: Tensor | list[int], student_vocab: int, teacher_vocab: int
    ) -> VocabMatch:
        student, teacher = torch.as_tensor(student, dtype=torch.long), torch.as_tensor(teacher, dtype=torch.long)
        if student.shape != teacher.shape or student.dim() != 1:
            raise ValueError(f"match: expected two [K] id lists, got {tuple(student.shape)} and {tuple(teacher.shape)}")
        for ids, vocab, side in ((student, student_vocab, "student"), (teacher, teacher_vocab, "teacher")):
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab or len(ids.unique()) != len(ids)):
                raise ValueError(f"match: {side} ids must be distinct and in [0, {vocab})")
        return cls(
            student, teacher, student_vocab, teacher_vocab, _rest(student, student_vocab), _rest(teacher, teacher_vocab)
        )

    @classmethod
    def none(cls, student_vocab: int, teacher_vocab: int) -> VocabMatch:
        """No token matched: ``uld``."""
        return cls.build([], [], student_vocab, teacher_vocab)

    @property
    def size(self) -> int:
        return int(self.student.shape[0])

    def to(self, device: torch.device) -> VocabMatch:
        move = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return VocabMatch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in move.items()})


def _rest(ids: Tensor, vocab: int) -> Tensor:
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[ids] = False
    return keep.nonzero().squeeze(1)


def _bucketed(log_p: Tensor, matched: Tensor, rest: Tensor) -> Tensor:
    """``[n, K + 1]``: the log-probabilities of the matched tokens, then of all the other tokens together."""
    tail = (
        torch.logsumexp(log_p[:, rest], -1, keepdim=True)
        if len(rest)
        else log_p.new_full((log_p.shape[0], 1), EMPTY_LOG)
    )
    return torch.cat([log_p[:, matched], tail.clamp_min(EMPTY_LOG)], 1)


def _sorted_l1(p_s: Tensor, p_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``sum |sort(p_s) - sort(p_t)|`` per row (decreasing, zero-padded), with the sign of each student entry's
    difference and the sort's indices (to scatter a gradient back to the student's token order)."""
    sorted_s, order = p_s.sort(-1, descending=True)
    sorted_t = p_t.sort(-1, descending=True).values
    width = max(sorted_s.shape[1], sorted_t.shape[1])
    diff = F.pad(sorted_s, (0, width - sorted_s.shape[1])).sub_(F.pad(sorted_t, (0, width - sorted_t.shape[1])))
    value = diff.abs().sum(-1)
    return value, diff[:, : sorted_s.shape[1]].sign_(), order


def cross_value_and_grad(s: Tensor, t: Tensor, match: VocabMatch, spec: DivergenceSpec) -> tuple[Tensor, Tensor]:
    """Per-row value (without ``T**2``) and its gradient w.r.t. the (temperature-scaled) student logits, from fp32
    log-probabilities ``s [n, Vs]`` and ``t [n, Vt]``. ``s`` and ``t`` are left unchanged."""
    p_s = s.exp()
    grad = torch.zeros_like(s)
    value = s.new_zeros(s.shape[0])
    if match.size:
        s_b, t_b = _bucketed(s, match.student, match.student_rest), _bucketed(t, match.teacher, match.teacher_rest)
        tail = s_b[:, -1:].clone()
        tiles = [torch.empty_like(s_b) for _ in range(2)]
        exact, grad_b = spec.row.value_and_grad(s_b, t_b, *tiles, spec.beta, spec.skew)  # overwrites s_b, t_b
        value += exact
        # y = [z_matched, logsumexp(z_rest)] up to a common shift: dL/dz_rest = dL/dy_tail * softmax(z_rest)
        grad[:, match.student] = grad_b[:, :-1]
        if len(match.student_rest):
            grad[:, match.student_rest] = grad_b[:, -1:] * (s[:, match.student_rest] - tail).exp_()
        p_rest_s, p_rest_t = p_s[:, match.student_rest], t[:, match.teacher_rest].exp()
    else:
        p_rest_s, p_rest_t = p_s, t.exp()
    uld, sign, order = _sorted_l1(p_rest_s, p_rest_t)
    value += uld
    g = torch.zeros_like(p_rest_s).scatter_(1, order, sign)  # dL/dp_s over the unmatched tokens
    if match.size:
        full = torch.zeros_like(s)
        full[:, match.student_rest] = g
        g = full
    # softmax Jacobian: dL/dz = p_s * (g - <p_s, g>)
    grad += g.sub_((p_s * g).sum(-1, keepdim=True)).mul_(p_s)
    return value, grad


def cross_per_token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, spec: DivergenceSpec, match: VocabMatch
) -> Tensor:
    """The reference: per-row values ``[n]`` (times ``T**2``) from full logits ``[n, Vs]`` and ``[n, Vt]``,
    differentiable by autograd (the sort's backward scatters the gradient back). The kernel must equal it."""
    temperature = spec.temperature
    wider = [torch.promote_types(z.dtype, torch.float32) for z in (student_logits, teacher_logits)]  # fp64 stays
    s = F.log_softmax(student_logits.to(wider[0]) / temperature, -1)
    t = F.log_softmax(teacher_logits.to(wider[1]) / temperature, -1)
    value = s.new_zeros(s.shape[0])
    if match.size:
        s_b, t_b = _bucketed(s, match.student, match.student_rest), _bucketed(t, match.teacher, match.teacher_rest)
        value = value + spec.row.value(s_b, t_b, spec.beta, spec.skew)
        s, t = s[:, match.student_rest], t[:, match.teacher_rest]
    p_s = s.exp().sort(-1, descending=True).values
    p_t = t.exp().sort(-1, descending=True).values
    width = max(p_s.shape[1], p_t.shape[1])
    uld = (F.pad(p_s, (0, width - p_s.shape[1])) - F.pad(p_t, (0, width - p_t.shape[1]))).abs().sum(-1)
    return (value + uld) * temperature**2


class _ChunkedCrossDivergence(torch.autograd.Function):
    """Sum over aligned pairs of :func:`cross_value_and_grad` times ``T**2``, from both models' hidden states; the
    student's gradients are computed in forward (:func:`distill.losses.divergences.pair_chunks`, with each head
    cropped to its own tokenizer's length)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        heads: tuple[OutputHead, OutputHead],
        spec: DivergenceSpec,
        match: VocabMatch,
    ) -> Tensor:
        inputs = (student_hidden, student_weight, student_bias)
        vocabs = (match.student_vocab, match.teacher_vocab)
        return pair_chunks(
            ctx,
            inputs,
            teacher_hidden,
            heads,
            spec,
            vocabs,
            0,
            lambda s, t, scratch: cross_value_and_grad(s, t, match, spec),
        )

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*release_gradients(ctx, grad_output), *(None,) * 4)


def chunked_cross_divergence(
    student_hidden: Tensor,
    student_head: Tensor | OutputHead,
    teacher_hidden: Tensor,
    teacher_head: Tensor | OutputHead,
    spec: DivergenceSpec,
    match: VocabMatch,
) -> Tensor:
    """SUM over aligned pairs of the cross-tokenizer divergence (``uld`` when ``match`` is empty, else ``gold`` with
    ``spec``'s kind on the matched tokens), ``spec.chunk_size`` pairs at a time. ``student_hidden [N, Hs]`` and
    ``teacher_hidden [N, Ht]`` are the two models' final hidden states at the N aligned pairs (row i of each predicts
    the same text); each head is cropped to its vocabulary in ``match``. Differentiable w.r.t. ``student_hidden`` and
    the student head's weight and bias only."""
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"hidden: expected [N, H] for both models, got {tuple(student_hidden.shape)} and "
            f"{tuple(teacher_hidden.shape)}"
        )
    student_head, teacher_head = as_head(student_head), as_head(teacher_head)
    if match.student_vocab > student_head.weight.shape[0] or match.teacher_vocab > teacher_head.weight.shape[0]:
        raise ValueError(
            f"match: vocabularies ({match.student_vocab}, {match.teacher_vocab}) exceed the heads' rows "
            f"({student_head.weight.shape[0]}, {teacher_head.weight.shape[0]})"
        )
    match = match.to(student_hidden.device)
    return _ChunkedCrossDivergence.apply(
        student_hidden,
        student_head.weight,
        student_head.bias,
        teacher_hidden.detach(),
        (student_head, teacher_head),
        spec,
        match,
    )
