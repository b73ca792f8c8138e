"""Offline ULD/GOLD against top-k rows stored in the teacher's own vocabulary: with k = the teacher's vocabulary the
kernel equals the online cross-tokenizer kernel; with a smaller k it equals its reference (the tail spread evenly),
values and gradients, whatever the chunking."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.cross import VocabMatch, chunked_cross_divergence
from distill.losses.cross_topk import chunked_cross_topk_divergence, cross_topk_per_token, teacher_log_probs
from distill.losses.kinds import DivergenceSpec
from distill.losses.topk import TopKTargets
from distill.offline.precompute import teacher_topk
from tests.distill.losses.test_cross_losses import MATCH_S, MATCH_T, VS, VT, _heads


def _case(gold: bool, k: int, temperature: float = 1.0):
    student, teacher = _heads()
    torch.manual_seed(5)
    h_s = torch.randn(9, 16, requires_grad=True)
    h_t = torch.randn(9, 24) * 2.0
    ids, logp, tail = teacher_topk(h_t, teacher, k, temperature, 4, VT)
    match = VocabMatch.build(MATCH_S, MATCH_T, VS, VT) if gold else VocabMatch.none(VS, VT)
    return student, teacher, h_s, h_t, TopKTargets(ids, logp, tail), match


@pytest.mark.parametrize("gold", [False, True], ids=["uld", "gold"])
@pytest.mark.parametrize(("kind", "temperature", "chunk"), [("forward_kl", 1.0, 4), ("jsd", 2.0, 100)])
def test_with_the_whole_teacher_vocabulary_it_is_the_online_loss(gold, kind, temperature, chunk):
    student, teacher, h_s, h_t, targets, match = _case(gold, VT, temperature)
    spec = DivergenceSpec(kind, temperature=temperature, chunk_size=chunk)
    online = chunked_cross_divergence(h_s, student, h_t, teacher, spec, match)
    offline = chunked_cross_topk_divergence(h_s, student, targets, spec, match)
    torch.testing.assert_close(offline, online, rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad(online, [h_s, student.weight])
    got = torch.autograd.grad(chunked_cross_topk_divergence(h_s, student, targets, spec, match), [h_s, student.weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gold", [False, True], ids=["uld", "gold"])
@pytest.mark.parametrize("chunk", [1, 4, 50])
def test_with_top_k_it_equals_the_reference_values_and_gradients(gold, chunk):
    student, _, h_s, _, targets, match = _case(gold, 5)
    spec = DivergenceSpec("reverse_kl", chunk_size=chunk)
    logits = h_s @ student.weight[:VS].T
    reference = cross_topk_per_token(logits, targets, spec, match).sum()
    expected = torch.autograd.grad(reference, [h_s, student.weight])
    got = chunked_cross_topk_divergence(h_s, student, targets, spec, match)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got * 0.5, [h_s, student.weight]), expected):
        torch.testing.assert_close(a, b * 0.5, rtol=1e-4, atol=1e-6)


def test_the_tail_is_spread_evenly_below_the_stored_values():
    ids = torch.tensor([[2, 0]])
    logp = torch.tensor([[math.log(0.5), math.log(0.3)]])
    t = teacher_log_probs(ids, logp, torch.tensor([math.log(0.2)]), 6).exp()
    torch.testing.assert_close(t, torch.tensor([[0.3, 0.05, 0.5, 0.05, 0.05, 0.05]]))
    empty = teacher_log_probs(
        torch.tensor([[1, 0]]), torch.log(torch.tensor([[0.6, 0.4]])), torch.tensor([-math.inf]), 2
    )
    torch.testing.assert_close(empty.exp(), torch.tensor([[0.4, 0.6]]))


def test_rows_that_do_not_match_the_aligned_states_are_refused():
    student, _, h_s, _, targets, match = _case(False, 5)
    spec = DivergenceSpec("forward_kl")
    short = TopKTargets(targets.ids[:-1], targets.logp[:-1], targets.log_tail[:-1])
    with pytest.raises(ValueError, match=r"targets: 8 stored rows for \(9, 16\) aligned student states"):
        chunked_cross_topk_divergence(h_s, student, short, spec, match)
    with pytest.raises(ValueError, match=r"outside the teacher's vocabulary of 20"):
        chunked_cross_topk_divergence(h_s, student, targets, spec, VocabMatch.none(VS, 20))
