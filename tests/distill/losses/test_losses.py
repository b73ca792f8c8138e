"""Divergences against direct probability-space references, chunked kernel parity, and normalisation."""

from __future__ import annotations

import os

import pytest
import torch

from distill.losses.divergences import (
    chunked_cross_entropy_sum,
    chunked_divergence,
    divergence,
    per_token_divergence,
    shared_vocab_size,
)
from distill.losses.registry import DIVERGENCES
from kd_core.config import ConfigError
from tests.conftest import REPO_ROOT

BETA, SKEW = 0.3, 0.2


def reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float
) -> torch.Tensor:
    """Per-token divergence written literally from the definitions with plain probabilities (float64)."""
    ps = torch.softmax(student_logits.double() / temperature, -1)
    pt = torch.softmax(teacher_logits.double() / temperature, -1)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward_kl":
        value = kl(pt, ps)
    elif kind == "reverse_kl":
        value = kl(ps, pt)
    elif kind == "jsd":
        m = BETA * pt + (1 - BETA) * ps
        value = BETA * kl(pt, m) + (1 - BETA) * kl(ps, m)
    elif kind == "skew_forward_kl":
        value = kl(pt, SKEW * pt + (1 - SKEW) * ps)
    elif kind == "skew_reverse_kl":
        value = kl(ps, SKEW * ps + (1 - SKEW) * pt)
    else:
        value = 0.5 * (pt - ps).abs().sum(-1)
    return value * temperature**2


def logits_pair(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * 2, torch.randn(*shape, generator=gen) * 2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_values_and_gradients_match_reference(kind: str, temperature: float) -> None:
    s, t = logits_pair(3, 4, 11)
    s.requires_grad_(True)
    ours = per_token_divergence(s, t, kind, temperature=temperature, beta=BETA, skew=SKEW)
    (grad_ours,) = torch.autograd.grad(ours.sum(), s)
    s64 = s.detach().double().requires_grad_(True)
    ref = reference(s64, t, kind, temperature)
    (grad_ref,) = torch.autograd.grad(ref.sum(), s64)
    assert ours.shape == (3, 4)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours.double(), grad_ref, rtol=1e-4, atol=1e-6)
    assert (ours >= -1e-6).all()  # every kind is a divergence


def test_temperature_scaling_multiplies_by_t_squared() -> None:
    s, t = logits_pair(5, 9)
    plain = per_token_divergence(s / 3.0, t / 3.0, "forward_kl")
    scaled = per_token_divergence(s, t, "forward_kl", temperature=3.0)
    torch.testing.assert_close(scaled, plain * 9.0)


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl() -> None:
    s, t = logits_pair(4, 7)
    torch.testing.assert_close(
        per_token_divergence(s, t, "jsd", beta=0.0), per_token_divergence(s, t, "forward_kl"), rtol=0, atol=0
    )
    torch.testing.assert_close(
        per_token_divergence(s, t, "jsd", beta=1.0), per_token_divergence(s, t, "reverse_kl"), rtol=0, atol=0
    )


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_follows_trl_gkd_convention(beta: float) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer  # trl 1.16: generalized_jsd_loss is a staticmethod

    s, t = logits_pair(2, 3, 13)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=2.0, reduction="sum")
    # TRL does not multiply by temperature**2.
    ours = per_token_divergence(s, t, "jsd", beta=beta, temperature=2.0).sum() / 4.0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_underflowing_probabilities_stay_finite(kind: str) -> None:
    # Spreads of thousands of logits underflow most probabilities to exactly 0 in fp32.
    s, t = logits_pair(6, 32)
    s, t = (s * 2000).requires_grad_(True), t * 2000
    value = per_token_divergence(s, t, kind, temperature=0.5, beta=BETA, skew=SKEW)
    (grad,) = torch.autograd.grad(value.sum(), s)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    head = torch.eye(32)
    hidden = s.detach().clone().requires_grad_(True)
    total = chunked_divergence(hidden, head, t, head, kind, temperature=0.5, beta=BETA, skew=SKEW, chunk_size=4)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(hidden.grad).all()
    torch.testing.assert_close(total, value.sum(), rtol=1e-4, atol=1e-3)


def test_mask_averages_counted_tokens_only() -> None:
    s, t = logits_pair(2, 5, 8)
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, False]])
    values = per_token_divergence(s, t, "reverse_kl")
    torch.testing.assert_close(divergence(s, t, "reverse_kl", mask=mask), values[mask].mean())
    torch.testing.assert_close(divergence(s, t, "reverse_kl"), values.mean())
    s.requires_grad_(True)
    none = divergence(s, t, "reverse_kl", mask=torch.zeros(2, 5, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and (s.grad == 0).all()


def _heads(n: int, hs: int, ht: int, vs: int, vt: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, hs, generator=gen),
        torch.randn(vs, hs, generator=gen) * 0.5,
        torch.randn(n, ht, generator=gen),
        torch.randn(vt, ht, generator=gen) * 0.5,
    )


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_equals_unchunked(kind: str) -> None:
    n, vocab = 11, 37
    h_s, w_s, h_t, w_t = _heads(n, 8, 12, vocab, vocab)
    mask = torch.ones(n, dtype=torch.bool)
    mask[[0, 4, 5, 10]] = False
    kwargs = {"temperature": 2.0, "beta": BETA, "skew": SKEW}

    h_ref, w_ref = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    values = per_token_divergence(h_ref @ w_ref.t(), h_t @ w_t.t(), kind, **kwargs)
    expected = values[mask].sum()
    expected.backward()

    for chunk_size in (1, 3, 4, 7, 64):
        hidden, head = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        total = chunked_divergence(hidden, head, h_t, w_t, kind, mask=mask, chunk_size=chunk_size, **kwargs)
        total.backward()
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(head.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
        assert (hidden.grad[~mask] == 0).all()

    hidden, head = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    nothing = chunked_divergence(hidden, head, h_t, w_t, kind, mask=torch.zeros(n, dtype=torch.bool), **kwargs)
    nothing.backward()
    assert nothing.item() == 0.0 and (hidden.grad == 0).all() and (head.grad == 0).all()


def test_chunked_backward_scales_by_grad_output_and_teacher_gets_no_grad() -> None:
    h_s, w_s, h_t, w_t = _heads(6, 4, 4, 10, 10)
    hidden, head = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    teacher_hidden, teacher_head = h_t.clone().requires_grad_(True), w_t.clone().requires_grad_(True)
    (3.0 * chunked_divergence(hidden, head, teacher_hidden, teacher_head, "jsd", chunk_size=4)).backward()
    h_ref = h_s.clone().requires_grad_(True)
    (3.0 * per_token_divergence(h_ref @ w_s.t(), h_t @ w_t.t(), "jsd").sum()).backward()
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
    assert teacher_hidden.grad is None and teacher_head.grad is None


def test_vocab_cropping_ignores_padding_rows() -> None:
    # Student head padded to 40 rows, teacher to 48, tokenizer has 37 tokens (like 151,936 vs 152,064).
    h_s, w_s, h_t, w_t = _heads(5, 6, 6, 40, 48)
    vocab = shared_vocab_size(40, 48, 37)
    head = w_s.clone().requires_grad_(True)
    total = chunked_divergence(h_s, head, h_t, w_t, "forward_kl", vocab_size=vocab, chunk_size=2)
    total.backward()
    expected = per_token_divergence(h_s @ w_s[:vocab].t(), h_t @ w_t[:vocab].t(), "forward_kl").sum()
    torch.testing.assert_close(total, expected)
    assert head.grad.shape == (40, 6) and (head.grad[vocab:] == 0).all() and (head.grad[:vocab] != 0).any()
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_divergence(h_s, w_s, h_t, w_t, "forward_kl")


@pytest.mark.parametrize("head_slice", [8192, 16], ids=["one_slice", "sliced"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "ce"])
def test_chunked_under_bf16_autocast_matches_the_autocast_reference(kind: str, head_slice: int, monkeypatch) -> None:
    # fp32 parameters under autocast (`bf16: true`): the kernels multiply in bfloat16, as the model's own lm_head
    # would, and hand back fp32 gradients; the reference is the same computation on full logits. A head slice of
    # 16 rows splits the 50-row head gradient into 4 products, the last one partial.
    monkeypatch.setattr("distill.losses.divergences.HEAD_SLICE", head_slice)
    h_s, w_s, h_t, w_t = _heads(9, 16, 16, 50, 50)
    targets = torch.arange(9) % 50
    grads = []
    for chunked in (True, False):
        hidden, head = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked and kind == "ce":
                total = chunked_cross_entropy_sum(hidden, head, targets, 4)
            elif chunked:
                total = chunked_divergence(hidden, head, h_t, w_t, kind, chunk_size=4)
            elif kind == "ce":
                total = torch.nn.functional.cross_entropy((hidden @ head.t()).float(), targets, reduction="sum")
            else:
                total = per_token_divergence(hidden @ head.t(), h_t @ w_t.t(), kind).sum()
        total.backward()
        assert hidden.grad.dtype == head.grad.dtype == torch.float32
        grads.append((total.detach(), hidden.grad, head.grad))
    (value, g_hidden, g_head), (want, want_hidden, want_head) = grads
    torch.testing.assert_close(value, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g_hidden, want_hidden, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g_head, want_head, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_bf16_head_gradient_slices_stop_at_the_cropped_vocabulary(kind: str, monkeypatch) -> None:
    # Head padded to 40 rows, 37 shared tokens (Qwen2.5: 151,936 rows, 151,665 tokens), slices of 16 rows: the last
    # slice is partial within the vocabulary and the head's padding rows are never touched. Found on an H200 under
    # bf16, where the last slice of the padded head and of the cropped gradient had different heights (a crash).
    monkeypatch.setattr("distill.losses.divergences.HEAD_SLICE", 16)
    h_s, w_s, h_t, w_t = _heads(9, 16, 16, 40, 40)
    grads = []
    for chunked in (True, False):
        hidden, head = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                total = chunked_divergence(hidden, head, h_t, w_t, kind, vocab_size=37, chunk_size=4)
            else:
                total = per_token_divergence(hidden @ head[:37].t(), h_t @ w_t[:37].t(), kind).sum()
        total.backward()
        grads.append((total.detach(), hidden.grad, head.grad))
    (value, g_hidden, g_head), (want, want_hidden, want_head) = grads
    torch.testing.assert_close(value, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g_hidden, want_hidden, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g_head, want_head, rtol=3e-2, atol=3e-2)
    assert (g_head[37:] == 0).all()


def test_shared_vocab_size() -> None:
    assert shared_vocab_size(151_936, 152_064, 151_665) == 151_665
    assert shared_vocab_size(300, 300, 300) == 300
    with pytest.raises(ConfigError, match="151936.*152064|152064.*151936") as err:
        shared_vocab_size(151_936, 152_064, 152_000)
    assert "152000" in str(err.value)
    with pytest.raises(ConfigError):
        shared_vocab_size(32_000, 151_936, 32_001)


def test_chunked_accepts_bf16_and_computes_in_fp32() -> None:
    h_s, w_s, h_t, w_t = (x.bfloat16() for x in _heads(9, 16, 16, 50, 50))
    hidden, head = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    total = chunked_divergence(hidden, head, h_t, w_t, "reverse_kl", chunk_size=4)
    total.backward()
    # Reference: the same bf16 projections (a bf16 lm_head yields bf16 logits), divergence in fp32.
    h_ref, w_ref = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    expected = per_token_divergence(h_ref @ w_ref.t(), h_t @ w_t.t(), "reverse_kl").sum()
    expected.backward()
    assert total.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16 and head.grad.dtype == torch.bfloat16
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden.grad.float(), h_ref.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(head.grad.float(), w_ref.grad.float(), rtol=2e-2, atol=2e-2)


def test_micro_batches_normalised_by_global_count_equal_one_batch() -> None:
    batch, seq, vocab = 8, 6, 29
    h_s, w_s, h_t, w_t = _heads(batch * seq, 8, 8, vocab, vocab, seed=3)
    h_s, h_t = h_s.view(batch, seq, 8), h_t.view(batch, seq, 8)
    # Different numbers of counted tokens per sequence (one sequence fully masked).
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 6, 4])
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    total_count = int(mask.sum())

    def run(micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, head = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        loss_sum = torch.zeros(())
        for i in range(0, batch, micro):
            part = slice(i, i + micro)
            loss = (
                chunked_divergence(
                    hidden[part].reshape(-1, 8),
                    head,
                    h_t[part].reshape(-1, 8),
                    w_t,
                    "skew_forward_kl",
                    mask=mask[part].reshape(-1),
                    temperature=1.5,
                    chunk_size=5,
                )
                / total_count
            )
            loss.backward()
            loss_sum += loss.detach()
        return loss_sum, hidden.grad, head.grad

    full, accumulated = run(8), run(2)
    for a, b in zip(full, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # ... and both equal the masked mean of the plain (autograd) divergence.
    hidden = h_s.clone().requires_grad_(True)
    mean = divergence(hidden @ w_s.t(), h_t @ w_t.t(), "skew_forward_kl", temperature=1.5, mask=mask)
    mean.backward()
    torch.testing.assert_close(full[0], mean.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(full[1], hidden.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_cross_entropy_equals_direct_cross_entropy(weighted: bool) -> None:
    """The CE kernel's in-forward gradient equals autograd through F.cross_entropy on the full logits."""
    torch.manual_seed(5)
    hidden = (torch.randn(23, 12) * 2).requires_grad_()
    head = torch.randn(50, 12, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    weights = torch.rand(23) * 2 if weighted else None
    per_token = torch.nn.functional.cross_entropy(hidden @ head.t(), targets, reduction="none")
    direct = (per_token * weights).sum() if weighted else per_token.sum()
    grads = torch.autograd.grad(direct, (hidden, head))
    for chunk_size in (1, 7, 23, 64):
        chunked = chunked_cross_entropy_sum(hidden, head, targets, chunk_size, weights)
        torch.testing.assert_close(chunked, direct)
        for got, want in zip(torch.autograd.grad(3.0 * chunked, (hidden, head)), grads):
            torch.testing.assert_close(got, 3.0 * want, rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_bf16_and_frozen_head() -> None:
    torch.manual_seed(6)
    hidden, head = torch.randn(9, 16).bfloat16().requires_grad_(), torch.randn(40, 16).bfloat16()
    targets = torch.randint(0, 40, (9,))
    value = chunked_cross_entropy_sum(hidden, head, targets, 4)
    value.backward()
    assert hidden.grad.dtype == torch.bfloat16 and head.grad is None
    reference = torch.nn.functional.cross_entropy((hidden @ head.t()).float(), targets, reduction="sum")
    torch.testing.assert_close(value, reference)


def test_bad_arguments_are_rejected() -> None:
    s, t = logits_pair(2, 5)
    with pytest.raises(ValueError, match="kind"):
        divergence(s, t, "kl")
    with pytest.raises(ValueError, match="beta"):
        divergence(s, t, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="mask"):
        divergence(s, t, "tvd", mask=torch.ones(3, dtype=torch.bool))


def test_benchmark_script_runs_and_variants_agree() -> None:
    import subprocess
    import sys

    script = REPO_ROOT / "bench" / "kd_loss.py"
    args = ["--vocab", "300", "--hidden", "16", "--tokens", "24", "--chunk-size", "7", "--repeats", "1"]
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--kind", "jsd", "--variants", "naive,ours"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ours") and "mem/naive" not in line for line in lines), proc.stdout
    diff = next(line for line in lines if line.startswith("ours: loss rel. diff"))
    assert float(diff.split("vs naive ")[1].split(",")[0]) < 1e-5


def test_cross_entropy_benchmark_script_runs_and_variants_agree() -> None:
    import subprocess
    import sys

    script = REPO_ROOT / "bench" / "ce_loss.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--sizes", "50:8:20,70:16:9", "--chunk-size", "6", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # the script asserts equal losses and gradients itself
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 50 ") or line.startswith("| 70 ")]
    assert len(rows) == 2 and all(row.endswith("x |") for row in rows), proc.stdout
