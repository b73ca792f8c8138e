"""Loss-term registry rows carry their code, and one spec (with the one default chunk size) drives every divergence."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distill.losses import registry
from distill.losses.divergences import chunked_divergence, divergence, per_token_divergence
from distill.losses.features import FeatureDistiller, FeatureSettings
from distill.losses.kinds import CHUNK_SIZE, KINDS, DivergenceSpec, as_spec
from distill.losses.objective import LossSettings
from distill.offline.precompute import PrecomputeConfig
from distill.student.tiny import tiny_llama


def test_every_divergence_and_feature_row_carries_its_code():
    for name, term in registry.TERMS.items():
        if term.family == "divergence":
            assert term.compute is KINDS[name]
        elif term.family == "feature":
            assert callable(term.compute), name
    assert registry.DIVERGENCES == tuple(KINDS)  # a row added to KINDS is a loss.terms name, with nothing else


def test_the_distiller_computes_each_term_with_its_rows_function(monkeypatch):
    """No if-chain left: replacing a row's function changes what FeatureDistiller returns for that term."""
    student, teacher = tiny_llama(40, hidden_size=16, num_layers=2, seed=0), tiny_llama(40, hidden_size=32, seed=1)
    distiller = FeatureDistiller({"gram": 1.0, "hidden_mse": 1.0}, FeatureSettings(), student.config, teacher.config)
    ids = torch.randint(3, 40, (2, 5))
    mask = torch.ones_like(ids)
    s_out, t_out = (m.model(input_ids=ids, output_hidden_states=True) for m in (student, teacher))
    before = distiller(s_out, t_out, mask)
    row = registry.TERMS["gram"]
    monkeypatch.setitem(registry.TERMS, "gram", dataclasses.replace(row, compute=lambda batch: torch.tensor(7.0)))
    after = distiller(s_out, t_out, mask)
    assert after["gram"].item() == 7.0 and before["gram"].item() != 7.0
    torch.testing.assert_close(after["hidden_mse"], before["hidden_mse"])


def test_one_default_chunk_size():
    assert DivergenceSpec("forward_kl").chunk_size == CHUNK_SIZE
    assert LossSettings().chunk_size == CHUNK_SIZE
    defaults = {f.name: f.default for f in dataclasses.fields(PrecomputeConfig)}
    assert defaults["chunk_size"] == CHUNK_SIZE
    assert LossSettings(temperature=2.0, beta=0.25, skew=0.3, chunk_size=7).spec("jsd") == DivergenceSpec(
        "jsd", temperature=2.0, beta=0.25, skew=0.3, chunk_size=7
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "kl"}, "kind: expected one of forward_kl"),
        ({"kind": "jsd", "temperature": 0.0}, "temperature: expected > 0"),
        ({"kind": "jsd", "beta": 1.5}, "beta: expected 0 <= beta <= 1"),
        ({"kind": "jsd", "skew": -0.1}, "skew: expected 0 <= skew <= 1"),
        ({"kind": "jsd", "chunk_size": 0}, "chunk_size: expected >= 1"),
    ],
)
def test_spec_validates_its_fields(options, message):
    with pytest.raises(ValueError, match=message):
        DivergenceSpec(**options)


def test_spec_or_keywords_not_both():
    spec = DivergenceSpec("tvd", temperature=2.0)
    assert as_spec(spec, {}) is spec
    assert as_spec("tvd", {"temperature": 2.0}) == spec
    with pytest.raises(TypeError, match="already holds temperature"):
        as_spec(spec, {"temperature": 1.0})


@pytest.mark.parametrize("kind", list(KINDS))
def test_spec_and_keywords_give_the_same_values(kind):
    torch.manual_seed(0)
    hidden, head = torch.randn(9, 8), torch.randn(30, 8)
    t_hidden, t_head = torch.randn(9, 8), torch.randn(30, 8)
    options = {"temperature": 1.5, "beta": 0.3, "skew": 0.2, "chunk_size": 4}
    spec = DivergenceSpec(kind, **options)
    assert torch.equal(
        chunked_divergence(hidden, head, t_hidden, t_head, spec),
        chunked_divergence(hidden, head, t_hidden, t_head, kind, **options),
    )
    s, t = hidden @ head.t(), t_hidden @ t_head.t()
    assert torch.equal(per_token_divergence(s, t, spec), per_token_divergence(s, t, kind, **options))
    assert torch.equal(divergence(s, t, spec), divergence(s, t, kind, **options))
