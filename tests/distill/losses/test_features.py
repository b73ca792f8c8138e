"""Feature and relation losses against direct loop-based references (values and gradients), layer maps, masks,
projectors and config errors. Tensor-level only; model-level tests live in ``test_features_models.py``."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig

from distill.losses.features import FeatureDistiller, FeatureSettings, hidden, relations
from distill.losses.features.attention import attention_transfer
from distill.losses.features.mapping import EMBEDDINGS, layer_pairs
from distill.losses.features.masking import pool
from distill.losses.features.minilm import relation_kl
from kd_core.config import ConfigError, from_dict


@pytest.fixture(autouse=True)
def _float64():
    """References and implementations must agree to ~1e-10, not to float32 noise. One thread: the tensors are
    tiny, and on a busy machine spinning OpenMP workers only cost time."""
    threads = torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(threads)


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)


def real_tokens(mask: torch.Tensor, b: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if mask[b, t]]


def assert_same_value_and_grad(fn, reference, *inputs: torch.Tensor) -> None:
    """Both functions give the same value and the same gradient with respect to the first input."""
    x = inputs[0].clone().requires_grad_(True)
    y = inputs[0].clone().requires_grad_(True)
    value = fn(x, *inputs[1:])
    expected = reference(y, *inputs[1:])
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=value.dtype))
    (grad,) = torch.autograd.grad(value, x)
    (expected_grad,) = torch.autograd.grad(expected, y)
    torch.testing.assert_close(grad, expected_grad)


# ----------------------------------------------------------------------------------------------------------------
# Loop-based references: one token, one row, one pair at a time.
# ----------------------------------------------------------------------------------------------------------------


def ref_per_token(student, teacher, mask, token_loss):
    values = [token_loss(student[b, t], teacher[b, t]) for b in range(len(mask)) for t in real_tokens(mask, b)]
    return sum(values) / len(values)


def ref_mse(s, t, mask):
    return ref_per_token(s, t, mask, lambda a, b: ((a - b) ** 2).sum() / a.numel())


def ref_cosine(s, t, mask):
    return ref_per_token(s, t, mask, lambda a, b: 1 - (a @ b) / (a.norm() * b.norm()))


def ref_nmse(s, t, mask):
    return ref_per_token(s, t, mask, lambda a, b: ((a - b) ** 2).sum() / (b @ b))


def ref_gram(s, t, mask):
    total, count = 0.0, 0
    for b in range(len(mask)):
        for i in real_tokens(mask, b):
            for j in real_tokens(mask, b):
                cos_s = s[b, i] @ s[b, j] / (s[b, i].norm() * s[b, j].norm())
                cos_t = t[b, i] @ t[b, j] / (t[b, i].norm() * t[b, j].norm())
                total, count = total + (cos_s - cos_t) ** 2, count + 1
    return total / count


def ref_fsp_matrix(lower, upper, mask, b):
    tokens = real_tokens(mask, b)
    outers = (torch.outer(lower[b, t] / lower[b, t].norm(), upper[b, t] / upper[b, t].norm()) for t in tokens)
    return sum(outers) / len(tokens)


def ref_fsp(s_low, s_up, t_low, t_up, mask):
    per_sample = [
        ((ref_fsp_matrix(s_low, s_up, mask, b) - ref_fsp_matrix(t_low, t_up, mask, b)) ** 2).sum()
        for b in range(len(mask))
    ]
    return sum(per_sample) / len(per_sample)


def ref_attention(s, t, mask, kind):
    total, count = 0.0, 0
    for b in range(len(mask)):
        for h in range(s.shape[1]):
            for i in real_tokens(mask, b):
                if kind == "kl":
                    # 0 log 0 = 0: padded keys have zero probability on both sides.
                    total += sum(
                        t[b, h, i, j] * (t[b, h, i, j] / s[b, h, i, j]).log()
                        for j in range(s.shape[-1])
                        if t[b, h, i, j] > 0
                    )
                    count += 1
                else:
                    for j in real_tokens(mask, b):
                        total, count = total + (s[b, h, i, j] - t[b, h, i, j]) ** 2, count + 1
    return total / count


def ref_relation(s, t, mask, heads):
    """Per sample, cut to its real tokens, split heads, softmax relation, KL per row."""
    total, count = 0.0, 0
    for b in range(len(mask)):
        tokens = real_tokens(mask, b)
        for h in range(heads):
            ws, wt = s.shape[-1] // heads, t.shape[-1] // heads  # each model's own relation-head width
            xs = s[b, tokens, h * ws : (h + 1) * ws]
            xt = t[b, tokens, h * wt : (h + 1) * wt]
            rs = torch.softmax(xs @ xs.T / math.sqrt(ws), -1)
            rt = torch.softmax(xt @ xt.T / math.sqrt(wt), -1)
            for i in range(len(tokens)):
                total, count = total + (rt[i] * (rt[i] / rs[i]).log()).sum(), count + 1
    return total / count


def huber(x):
    return 0.5 * x**2 if abs(x) < 1 else abs(x) - 0.5


def ref_rkd_distance(s, t):
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mean_s = sum((s[i] - s[j]).norm() for i, j in pairs) / len(pairs)
    mean_t = sum((t[i] - t[j]).norm() for i, j in pairs) / len(pairs)
    return sum(huber((s[i] - s[j]).norm() / mean_s - (t[i] - t[j]).norm() / mean_t) for i, j in pairs) / len(pairs)


def ref_rkd_angle(s, t):
    def cos_at(x, j, i, k):
        a, b = x[i] - x[j], x[k] - x[j]
        return a @ b / (a.norm() * b.norm())

    n = len(s)
    triplets = [(j, i, k) for j in range(n) for i in range(n) for k in range(n) if len({i, j, k}) == 3]
    return sum(huber(cos_at(s, *tr) - cos_at(t, *tr)) for tr in triplets) / len(triplets)


def ref_similarity_preserving(s, t):
    n = len(s)

    def normalised_gram(x):
        rows = []
        for i in range(n):
            row = torch.stack([x[i] @ x[j] for j in range(n)])
            rows.append(row / row.norm())
        return torch.stack(rows)

    return ((normalised_gram(s) - normalised_gram(t)) ** 2).sum() / n**2


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, reference",
    [
        (hidden.hidden_mse, ref_mse),
        (hidden.hidden_cosine, ref_cosine),
        (hidden.hidden_nmse, ref_nmse),
        (hidden.gram, ref_gram),
    ],
)
def test_hidden_losses_match_reference(fn, reference):
    torch.manual_seed(0)
    assert_same_value_and_grad(fn, reference, torch.randn(3, 5, 6), torch.randn(3, 5, 6), MASK)


def test_fsp_matches_reference():
    torch.manual_seed(1)
    s_low, s_up, t_low, t_up = (torch.randn(3, 5, 4) for _ in range(4))
    assert_same_value_and_grad(
        lambda x, *r: hidden.fsp(x, *r), lambda x, *r: ref_fsp(x, *r), s_low, s_up, t_low, t_up, MASK
    )


def attention_probs(batch: int, heads: int) -> torch.Tensor:
    """Probabilities as HF returns them: padded keys get zero probability."""
    return torch.softmax(torch.randn(batch, heads, 5, 5).masked_fill(~MASK[:, None, None, :], -1e9), -1)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_attention_transfer_matches_reference(kind):
    torch.manual_seed(2)
    student, teacher = attention_probs(3, 2), attention_probs(3, 2)
    assert_same_value_and_grad(
        lambda s, t, m: attention_transfer(s, t, m, kind),
        lambda s, t, m: ref_attention(s, t, m, kind),
        student,
        teacher,
        MASK,
    )


def test_attention_head_matching():
    torch.manual_seed(3)
    student, teacher = attention_probs(3, 2), attention_probs(3, 4)
    averaged = attention_transfer(student, teacher, MASK, "mse", "average")
    expected = ref_attention(student.mean(1, keepdim=True), teacher.mean(1, keepdim=True), MASK, "mse")
    torch.testing.assert_close(averaged, expected)
    explicit = attention_transfer(student, teacher, MASK, "kl", [3, 1])
    torch.testing.assert_close(explicit, ref_attention(student, teacher[:, [3, 1]], MASK, "kl"))


def test_minilm_relation_matches_reference_with_different_widths():
    torch.manual_seed(4)
    student, teacher = torch.randn(3, 5, 8), torch.randn(3, 5, 12)  # 4 relation heads of width 2 and 3
    assert_same_value_and_grad(
        lambda s, t, m: relation_kl(s, t, m, 4), lambda s, t, m: ref_relation(s, t, m, 4), student, teacher, MASK
    )


@pytest.mark.parametrize(
    "fn, reference",
    [
        (relations.rkd_distance, ref_rkd_distance),
        (relations.rkd_angle, ref_rkd_angle),
        (relations.similarity_preserving, ref_similarity_preserving),
    ],
)
def test_relation_losses_match_reference(fn, reference):
    torch.manual_seed(5)
    # Student and teacher widths differ on purpose: relations need no projector.
    assert_same_value_and_grad(fn, reference, torch.randn(5, 3), torch.randn(5, 7))


def test_pooling_uses_only_real_tokens():
    torch.manual_seed(6)
    states = torch.randn(3, 5, 4)
    for b in range(3):
        tokens = real_tokens(MASK, b)
        torch.testing.assert_close(pool(states, MASK, "mean")[b], states[b, tokens].mean(0))
        torch.testing.assert_close(pool(states, MASK, "last")[b], states[b, tokens[-1]])
    left_padded = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(pool(states[:1], left_padded, "last")[0], states[0, 4])
    torch.testing.assert_close(pool(states, MASK, "cls"), states[:, 0])


@pytest.mark.parametrize(
    "fn",
    [hidden.hidden_mse, hidden.hidden_cosine, hidden.hidden_nmse, hidden.gram, lambda s, t, m: relation_kl(s, t, m, 2)],
)
def test_padded_positions_do_not_count(fn):
    torch.manual_seed(7)
    student, teacher = torch.randn(3, 5, 6), torch.randn(3, 5, 6)
    before = fn(student, teacher, MASK)
    # Garbage, including a zero vector (0/0 cosine) and huge values, at every padded position.
    student[~MASK] = 1e6 * torch.randn(int((~MASK).sum()), 6)
    teacher[~MASK] = 0.0
    student.requires_grad_(True)
    after = fn(student, teacher, MASK)
    torch.testing.assert_close(after, before)
    (grad,) = torch.autograd.grad(after, student)
    assert torch.isfinite(grad).all() and (grad[~MASK] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Layer maps and projectors
# ----------------------------------------------------------------------------------------------------------------

EXPECTED_PAIRS = {
    ("uniform", 2): [(0, 2), (1, 5)],
    ("uniform", 3): [(0, 1), (1, 3), (2, 5)],
    ("uniform", 4): [(0, 0), (1, 2), (2, 3), (3, 5)],
    ("last_k", 2): [(0, 4), (1, 5)],
    ("last_k", 3): [(0, 3), (1, 4), (2, 5)],
    ("last_k", 4): [(0, 2), (1, 3), (2, 4), (3, 5)],
    ("explicit", 2): [(0, 1), (1, 5)],
    ("explicit", 3): [(0, 1), (2, 5)],
    ("explicit", 4): [(0, 1), (3, 5)],
}


def tiny_config(layers: int, hidden: int, heads: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=50,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )


@pytest.mark.parametrize("strategy", ["uniform", "last_k", "explicit"])
@pytest.mark.parametrize("student_layers", [2, 3, 4])
def test_layer_maps_for_students_of_a_six_layer_teacher(strategy, student_layers):
    settings = FeatureSettings(layer_map=strategy, layers=[[0, 1], [-1, -1]], include_embeddings=True)
    distiller = FeatureDistiller({"hidden_mse": 1.0}, settings, tiny_config(student_layers, 16), tiny_config(6, 32))
    assert distiller.pairs == [(EMBEDDINGS, EMBEDDINGS)] + EXPECTED_PAIRS[strategy, student_layers]
    # One student->teacher projector per mapped pair, as widths differ.
    assert len(distiller.projectors) == len(distiller.pairs)
    assert all(p.weight.shape == (32, 16) for p in distiller.projectors.values())


def test_last_k_maps_only_k_layers_and_equal_widths_need_no_projector():
    assert layer_pairs("last_k", 4, 6, last_k=2) == [(2, 4), (3, 5)]
    distiller = FeatureDistiller({"hidden_cosine": 1.0}, FeatureSettings(), tiny_config(3, 32), tiny_config(6, 32))
    assert len(distiller.projectors) == 0


def test_settings_from_yaml_data():
    settings = from_dict(FeatureSettings, {"layer_map": "explicit", "layers": [[0, 2]], "head_map": [1, 0]})
    assert settings.layers == [[0, 2]] and settings.head_map == [1, 0]
    assert from_dict(FeatureSettings, {"head_map": "average"}).head_map == "average"
    with pytest.raises(ConfigError, match="head_map"):
        from_dict(FeatureSettings, {"head_map": "first"})
    with pytest.raises(ConfigError, match="layer_map"):
        from_dict(FeatureSettings, {"layer_map": "skip"})


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_layer_map_naming_a_missing_layer():
    settings = FeatureSettings(layer_map="explicit", layers=[[0, 1], [1, 6]])
    with pytest.raises(ConfigError, match=r"layers\[1\] teacher: layer 6 does not exist .*0\.\.5"):
        FeatureDistiller({"hidden_mse": 1.0}, settings, tiny_config(2, 16), tiny_config(6, 32))
    settings = FeatureSettings(layer_map="explicit", layers=[[3, 1]])
    with pytest.raises(ConfigError, match=r"layers\[0\] student: layer 3"):
        FeatureDistiller({"hidden_mse": 1.0}, settings, tiny_config(2, 16), tiny_config(6, 32))
    with pytest.raises(ConfigError, match="minilm_teacher_layer: layer 9"):
        FeatureDistiller(
            {"minilm_v2": 1.0}, FeatureSettings(minilm_teacher_layer=9), tiny_config(2, 16), tiny_config(6, 32)
        )


def test_unknown_term_and_negative_weight():
    with pytest.raises(ConfigError, match="unknown feature loss term 'hidden_mes'; did you mean 'hidden_mse'"):
        FeatureDistiller({"hidden_mes": 1.0}, FeatureSettings(), tiny_config(2, 16), tiny_config(6, 32))
    with pytest.raises(ConfigError, match="rkd_angle: weight must be >= 0"):
        FeatureDistiller({"rkd_angle": -1.0}, FeatureSettings(), tiny_config(2, 16), tiny_config(6, 32))


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_attention_terms_need_eager_attention(implementation):
    student, teacher = tiny_config(2, 16), tiny_config(6, 32)
    teacher._attn_implementation = implementation
    with pytest.raises(ConfigError, match=f"teacher's attention probabilities.*'{implementation}'.*eager"):
        FeatureDistiller({"attention_transfer": 1.0}, FeatureSettings(), student, teacher)


@pytest.mark.parametrize("term, smallest", [("rkd_distance", 2), ("rkd_angle", 3), ("similarity_preserving", 2)])
def test_relation_loss_on_a_batch_of_one(term, smallest):
    distiller = FeatureDistiller({term: 1.0}, FeatureSettings(), tiny_config(2, 16), tiny_config(6, 32))
    distiller.check_batch_size(smallest)
    with pytest.raises(ConfigError, match=f"{term}: .*at least {smallest} samples per batch.*got 1"):
        distiller.check_batch_size(1)
