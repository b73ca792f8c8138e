"""Structured pruning proves itself: masked teacher == pruned model, and save -> from_pretrained -> same logits."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from distill.student.prune.calibration import Calibration
from distill.student.prune.families import family_for
from distill.student.prune.importance import collect_importance
from distill.student.prune.masked import mask_teacher
from distill.student.prune.structured import Targets, build_pruned_model, plan_pruning, validate_targets
from kd_core.config import ConfigError

VOCAB = 300


def _llama_gqa() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        architectures=["LlamaForCausalLM"],
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _qwen2_explicit_head_dim() -> Qwen2ForCausalLM:
    # head_dim 24 != hidden 64 / 4 heads: the config must carry head_dim, never recompute it.
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        architectures=["Qwen2ForCausalLM"],
        pad_token_id=0,
    )
    torch.manual_seed(1)
    return Qwen2ForCausalLM(config).eval()


def _calibration() -> Calibration:
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # a padded row: padding must not count as activation
    return Calibration(ids, mask, "random", int(mask.sum()))


TARGETS = [
    Targets(num_layers=2, depth_method="block_influence"),
    Targets(num_attention_heads=2),
    Targets(intermediate_size=40),
    Targets(hidden_size=40),
    Targets(depth_method="explicit", drop_layers=[1], num_attention_heads=2, intermediate_size=50, hidden_size=48),
    Targets(num_layers=2, depth_method="uniform", num_attention_heads=2, hidden_size=32, criterion="magnitude"),
]


TARGET_IDS = ["depth-bi", "heads", "mlp", "hidden", "all-explicit", "magnitude"]
CASES = [(_llama_gqa, t) for t in TARGETS] + [(_qwen2_explicit_head_dim, TARGETS[i]) for i in (1, 3, 4)]
CASE_IDS = [f"llama-gqa-{i}" for i in TARGET_IDS] + [f"qwen2-head_dim24-{TARGET_IDS[i]}" for i in (1, 3, 4)]


@pytest.mark.parametrize(("make", "targets"), CASES, ids=CASE_IDS)
def test_masked_teacher_equals_pruned_model(make, targets: Targets) -> None:
    teacher = make()
    family = family_for(teacher.config)
    validate_targets(teacher.config, family, targets)
    importance = collect_importance(teacher, family, _calibration(), batch_size=2)
    plan = plan_pruning(teacher.config, family, targets, teacher.state_dict(), importance)
    student = build_pruned_model(teacher, family, plan)
    reference = copy.deepcopy(teacher)
    mask_teacher(reference, family, plan)
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        expected, got, original = (
            reference(input_ids=ids).logits,
            student(input_ids=ids).logits,
            teacher(input_ids=ids).logits,
        )
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, original, atol=1e-3)  # something was really removed
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def _other_families() -> list:
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from distill.student.tiny import tiny_llama

    shape = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
    }
    tied = tiny_llama(VOCAB, num_layers=3, tie_word_embeddings=True)
    tied.config.architectures = ["LlamaForCausalLM"]
    return [
        tied,  # tied embeddings: hidden pruning slices the one shared matrix
        Qwen3ForCausalLM(Qwen3Config(**shape, num_key_value_heads=2, head_dim=24, architectures=["Qwen3ForCausalLM"])),
        MistralForCausalLM(
            MistralConfig(**shape, num_key_value_heads=1, head_dim=8, architectures=["MistralForCausalLM"])
        ),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["llama-tied", "qwen3-qk-norm", "mistral-mqa"])
def test_other_decoders_masked_equal_pruned(index: int) -> None:
    teacher = _other_families()[index].eval()
    family = family_for(teacher.config)
    heads = 4 if teacher.config.num_key_value_heads == 1 else 2  # one KV head: every query head is one group
    targets = Targets(
        depth_method="explicit", drop_layers=[1], num_attention_heads=heads, intermediate_size=50, hidden_size=40
    )
    plan = plan_pruning(
        teacher.config, family, targets, teacher.state_dict(), collect_importance(teacher, family, _calibration(), 4)
    )
    student = build_pruned_model(teacher, family, plan)
    reference = copy.deepcopy(teacher)
    mask_teacher(reference, family, plan)
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, reference(input_ids=ids).logits, atol=2e-5, rtol=1e-4)
    if teacher.config.tie_word_embeddings:
        assert student.lm_head.weight is student.model.embed_tokens.weight


def _load_with_log(path) -> tuple[torch.nn.Module, str, dict]:
    """from_pretrained with transformers' warnings captured and the loading info returned."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    return model.eval(), "\n".join(records), info


def test_save_reload_identical_and_config_rewritten(tmp_path) -> None:
    teacher = _qwen2_explicit_head_dim()
    family = family_for(teacher.config)
    targets = Targets(
        depth_method="explicit", drop_layers=[0], num_attention_heads=2, intermediate_size=50, hidden_size=40
    )
    plan = plan_pruning(
        teacher.config, family, targets, teacher.state_dict(), collect_importance(teacher, family, _calibration(), 4)
    )
    student = build_pruned_model(teacher, family, plan)
    student.save_pretrained(tmp_path / "s")
    assert not list((tmp_path / "s").glob("*.bin"))  # safetensors only, never pickle
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 40, 50)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 24)
    assert config["layer_types"] == ["full_attention"] * 2
    reloaded, log, info = _load_with_log(tmp_path / "s")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert "missing" not in log.lower() and "unexpected" not in log.lower() and "newly initialized" not in log, log
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)
    # The check above can fail: a stale layer count in config.json is reported as missing weights.
    config["num_hidden_layers"] = 3
    config["layer_types"] = ["full_attention"] * 3
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    _, _, stale_info = _load_with_log(tmp_path / "s")
    assert stale_info["missing_keys"]


def test_block_influence_drops_the_least_influential_layer() -> None:
    teacher = _llama_gqa()
    family = family_for(teacher.config)
    with torch.no_grad():  # make layer 2 an exact identity: its influence is 0, so it must go first
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    importance = collect_importance(teacher, family, _calibration(), batch_size=4)
    assert importance.block_influence[2] == pytest.approx(0.0, abs=1e-6)
    assert importance.block_influence.min() == importance.block_influence[2]
    plan = plan_pruning(teacher.config, family, Targets(num_layers=3), teacher.state_dict(), importance)
    assert plan.kept_layers == [0, 1, 3]


def test_gqa_groups_removed_whole() -> None:
    teacher = _llama_gqa()  # 4 query heads, 2 KV heads: groups of 2 adjacent query heads
    family = family_for(teacher.config)
    importance = collect_importance(teacher, family, _calibration(), batch_size=4)
    importance.channels["q.0"] = torch.zeros(64)
    importance.channels["q.0"][32:48] = 1.0  # head 2 (group 1) is the most important
    plan = plan_pruning(teacher.config, family, Targets(num_attention_heads=2), teacher.state_dict(), importance)
    assert plan.keep["q.0"].tolist() == list(range(32, 64))  # heads 2 and 3 together
    assert plan.keep["kv.0"].tolist() == list(range(16, 32))  # their shared KV head 1


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (Targets(num_attention_heads=3), "multiple of the 2 query heads"),
        (Targets(num_attention_heads=8), "expected 1..4"),
        (Targets(depth_method="explicit", drop_layers=[0, 1, 2, 3]), "zero layers"),
        (Targets(num_layers=0), "depth.num_layers"),
        (Targets(intermediate_size=1000), "width.intermediate_size"),
        (Targets(hidden_size=65), "width.hidden_size"),
        (Targets(depth_method="explicit", drop_layers=[7]), "depth.drop_layers"),
    ],
)
def test_unreachable_targets_are_config_errors(targets: Targets, message: str) -> None:
    teacher = _llama_gqa()
    with pytest.raises(ConfigError, match=message):
        validate_targets(teacher.config, family_for(teacher.config), targets)


def test_unsupported_family_is_a_config_error() -> None:
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        family_for(GPT2Config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConfigError, match="architecture LlamaForSequenceClassification"):
        family_for(LlamaConfig(architectures=["LlamaForSequenceClassification"]))


def test_shape_transformers_rejects_is_a_config_error() -> None:
    from distill.student.prune.structured import check_target_config

    teacher = _llama_gqa()  # LlamaConfig (5.23) requires hidden_size % num_attention_heads == 0 when saved
    with pytest.raises(ConfigError, match="not a multiple of the number of attention heads"):
        check_target_config(teacher.config, family_for(teacher.config), Targets(num_attention_heads=2, hidden_size=41))
    check_target_config(teacher.config, family_for(teacher.config), Targets(num_attention_heads=2, hidden_size=40))
