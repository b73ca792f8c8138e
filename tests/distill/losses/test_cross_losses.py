"""Cross-tokenizer divergences (distill/losses/cross.py): ULD and GOLD against direct full-logit references, the
chunked kernel's values and gradients, each model's own head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.losses.cross import VocabMatch, chunked_cross_divergence, cross_per_token_divergence
from distill.losses.head import OutputHead
from distill.losses.kinds import DivergenceSpec

VS, VT = 23, 31  # different vocabularies, the teacher's larger
MATCH_S, MATCH_T = [0, 3, 5, 7, 11, 20], [4, 1, 30, 9, 12, 2]


def _uld_by_hand(student_logits, teacher_logits, temperature=1.0):
    """Boizard et al.: L1 between the sorted probability vectors, the shorter zero-padded (one row at a time)."""
    values = []
    for zs, zt in zip(student_logits, teacher_logits):
        ps = sorted(torch.softmax(zs / temperature, -1).tolist(), reverse=True)
        pt = sorted(torch.softmax(zt / temperature, -1).tolist(), reverse=True)
        width = max(len(ps), len(pt))
        ps, pt = ps + [0.0] * (width - len(ps)), pt + [0.0] * (width - len(pt))
        values.append(sum(abs(a - b) for a, b in zip(ps, pt)) * temperature**2)
    return torch.tensor(values)


def _gold_by_hand(zs, zt, kind):
    """The exact part spelt out for forward KL: matched tokens plus one bucket, then ULD on the rest."""
    ps, pt = torch.softmax(zs.double(), -1), torch.softmax(zt.double(), -1)
    rest_s = [i for i in range(VS) if i not in MATCH_S]
    rest_t = [i for i in range(VT) if i not in MATCH_T]
    qs = torch.cat([ps[:, MATCH_S], ps[:, rest_s].sum(-1, keepdim=True)], 1)
    qt = torch.cat([pt[:, MATCH_T], pt[:, rest_t].sum(-1, keepdim=True)], 1)
    exact = (qt * (qt.log() - qs.log())).sum(-1) if kind == "forward_kl" else (qs * (qs.log() - qt.log())).sum(-1)
    a = ps[:, rest_s].sort(-1, descending=True).values
    b = pt[:, rest_t].sort(-1, descending=True).values
    b = F.pad(b, (0, a.shape[1] - b.shape[1])) if a.shape[1] > b.shape[1] else b
    a = F.pad(a, (0, b.shape[1] - a.shape[1]))
    return exact + (a - b).abs().sum(-1)


def test_uld_reference_is_boizards_definition():
    torch.manual_seed(0)
    zs, zt = torch.randn(5, VS) * 3, torch.randn(5, VT) * 3
    for temperature in (1.0, 2.0):
        spec = DivergenceSpec("forward_kl", temperature=temperature)
        got = cross_per_token_divergence(zs, zt, spec, VocabMatch.none(VS, VT))
        torch.testing.assert_close(got, _uld_by_hand(zs, zt, temperature), rtol=1e-5, atol=1e-6)
    # Same distribution up to a relabelling of tokens: ULD is 0 (it only compares shapes).
    perm = torch.randperm(VS)
    same = cross_per_token_divergence(zs, zs[:, perm], DivergenceSpec("forward_kl"), VocabMatch.none(VS, VS))
    torch.testing.assert_close(same, torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_gold_reference_is_exact_on_matched_tokens_and_uld_on_the_rest(kind):
    torch.manual_seed(1)
    zs, zt = torch.randn(4, VS) * 2, torch.randn(4, VT) * 2
    match = VocabMatch.build(MATCH_S, MATCH_T, VS, VT)
    got = cross_per_token_divergence(zs, zt, DivergenceSpec(kind), match)
    torch.testing.assert_close(got.double(), _gold_by_hand(zs, zt, kind), rtol=1e-4, atol=1e-6)
    # A teacher whose matched tokens carry the student's probabilities exactly, rest the same shape: 0.
    zt_same = torch.full((4, VT), -30.0)
    zt_same[:, MATCH_T] = zs[:, MATCH_S]
    rest_s = [i for i in range(VS) if i not in MATCH_S]
    rest_t = [i for i in range(VT) if i not in MATCH_T]
    zt_same[:, rest_t[: len(rest_s)]] = zs[:, rest_s].flip(1)
    torch.testing.assert_close(
        cross_per_token_divergence(zs, zt_same, DivergenceSpec(kind), match), torch.zeros(4), atol=1e-5, rtol=0
    )


def _heads(hs=16, ht=24, bias=False, softcap=None):
    torch.manual_seed(2)
    ws, wt = torch.randn(VS + 3, hs) * 0.5, torch.randn(VT + 5, ht) * 0.5  # padding rows beyond each vocabulary
    student = OutputHead(ws.requires_grad_(), torch.randn(VS + 3).requires_grad_() if bias else None, 1.0, softcap)
    teacher = OutputHead(wt, torch.randn(VT + 5) if bias else None, 1.0, 30.0 if softcap else None)
    return student, teacher


@pytest.mark.parametrize("gold", [False, True], ids=["uld", "gold"])
@pytest.mark.parametrize(
    ("kind", "temperature", "chunk", "head"),
    [
        ("forward_kl", 1.0, 3, "plain"),
        ("jsd", 2.0, 4, "bias"),
        ("reverse_kl", 0.7, 100, "softcap"),
        ("skew_forward_kl", 1.0, 1, "plain"),
        ("tvd", 1.5, 5, "bias"),
    ],
)
def test_kernel_matches_reference_values_and_gradients(gold, kind, temperature, chunk, head):
    student, teacher = _heads(bias=head == "bias", softcap=5.0 if head == "softcap" else None)
    torch.manual_seed(3)
    n = 11
    h_s = torch.randn(n, 16, requires_grad=True)
    h_t = torch.randn(n, 24)
    match = VocabMatch.build(MATCH_S, MATCH_T, VS, VT) if gold else VocabMatch.none(VS, VT)
    spec = DivergenceSpec(kind, temperature=temperature, chunk_size=chunk, beta=0.3)

    def logits(head_, hidden, vocab):
        z = hidden @ head_.weight[:vocab].T
        if head_.bias is not None:
            z = z + head_.bias[:vocab]
        return z if head_.softcap is None else head_.softcap * torch.tanh(z / head_.softcap)

    reference = cross_per_token_divergence(logits(student, h_s, VS), logits(teacher, h_t, VT), spec, match).sum()
    params = [h_s, student.weight] + ([student.bias] if student.bias is not None else [])
    expected = torch.autograd.grad(reference, params)
    got = chunked_cross_divergence(h_s, student, h_t, teacher, spec, match)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got * 1.7, params), expected):
        torch.testing.assert_close(a, b * 1.7, rtol=1e-4, atol=1e-5)
        assert a.shape[0] in (n, VS + 3)  # padding rows of the head get a zero gradient
    assert (
        torch.autograd.grad(chunked_cross_divergence(h_s, student, h_t, teacher, spec, match), student.weight)[0][VS:]
        .abs()
        .sum()
        == 0
    )


def test_gradient_is_the_finite_difference():
    """Independent of autograd's sort backward: the reference's gradient in float64 against central differences
    (gradcheck), and the kernel's (fp32) against a central difference along a random direction. ULD is piecewise
    smooth (sort order, sign of each difference): the steps are small enough not to cross a kink here."""
    torch.manual_seed(4)
    match = VocabMatch.build(MATCH_S, MATCH_T, VS, VT)
    spec = DivergenceSpec("jsd", beta=0.5, chunk_size=4)
    zs, zt = torch.randn(3, VS, dtype=torch.float64, requires_grad=True), torch.randn(3, VT, dtype=torch.float64)
    for m in (match, VocabMatch.none(VS, VT)):
        assert torch.autograd.gradcheck(
            lambda z, m=m: cross_per_token_divergence(z, zt, spec, m).sum(), (zs,), eps=1e-7
        )
    student, teacher = _heads()
    h_s, h_t = torch.randn(6, 16, requires_grad=True), torch.randn(6, 24)
    grad = torch.autograd.grad(chunked_cross_divergence(h_s, student, h_t, teacher, spec, match), h_s)[0]
    direction = torch.randn_like(h_s)
    eps = 1e-3
    with torch.no_grad():
        up = chunked_cross_divergence(h_s + eps * direction, student.weight.detach(), h_t, teacher, spec, match)
        down = chunked_cross_divergence(h_s - eps * direction, student.weight.detach(), h_t, teacher, spec, match)
    numeric = float((up - down) / (2 * eps))
    assert abs(numeric - float((grad * direction).sum())) < 1e-2 * max(1.0, abs(numeric))


def test_training_on_the_divergence_lowers_it():
    student, teacher = _heads()
    torch.manual_seed(5)
    h_s, h_t = torch.randn(8, 16, requires_grad=True), torch.randn(8, 24)
    match = VocabMatch.build(MATCH_S, MATCH_T, VS, VT)
    spec = DivergenceSpec("forward_kl")
    optimizer = torch.optim.SGD([h_s, student.weight], lr=0.5)
    first = None
    for _ in range(30):
        loss = chunked_cross_divergence(h_s, student, h_t, teacher, spec, match) / 8
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.5 * first


def test_match_must_be_one_to_one_and_in_range():
    with pytest.raises(ValueError, match="distinct"):
        VocabMatch.build([1, 1], [2, 3], VS, VT)
    with pytest.raises(ValueError, match=r"in \[0, 31\)"):
        VocabMatch.build([1], [31], VS, VT)
