"""Training on rationales: the distilling step-by-step expansion and loss weighting (normalised by counted tokens,
independent of the micro-batch split), and the answer-accuracy metric with greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.data.datasets import DataSettings, collate, tokenize_records
from distill.losses.objective import LossSettings, StudentWithObjective, target_positions
from kd_core.config import ConfigError
from tests.conftest import REPO_ROOT, nested_config

ROWS = [
    {
        "prompt": "Ann has 3 cats and gets 4 more. How many cats?",
        "rationale": "3 + 4 = 7. So the answer is 7.",
        "label": "7",
    },
    {
        "prompt": "Bo has 10 pens and loses 6. How many pens?",
        "rationale": "10 - 6 = 4. So the answer is 4.",
        "label": "4",
    },
]
for _row in ROWS:  # the columns `data-gen cot` writes: plain rationale SFT reads prompt/completion
    _row["completion"] = _row["rationale"]


def test_step_by_step_expands_each_record_into_weighted_label_and_rationale_examples(tokenizer):
    settings = DataSettings(train_file="x", step_by_step_label_weight=0.3)
    data = tokenize_records(ROWS, tokenizer, settings, "x")
    assert len(data) == 4 and [e["sample_id"] for e in data.examples] == [0, 0, 1, 1]
    assert [e["loss_weight"] for e in data.examples] == pytest.approx([0.3, 0.7, 0.3, 0.7])
    label_text = tokenizer.decode(data[0]["input_ids"])
    rationale_text = tokenizer.decode(data[1]["input_ids"])
    assert "[label] Ann has" in label_text and "[rationale] Ann has" in rationale_text
    target = tokenizer.decode([t for t in data[1]["labels"] if t != -100])
    assert "So the answer is 7." in target and "[rationale]" not in target
    plain = tokenize_records(ROWS, tokenizer, DataSettings(train_file="x"), "x")
    assert len(plain) == 2 and collate(plain.examples, 0)["loss_weights"].tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError, match=r"row 0: step-by-step training needs string columns \['label'\]"):
        tokenize_records([{"prompt": "q", "rationale": "r"}], tokenizer, settings, "x")


def test_weighted_ce_equals_the_hand_computed_weighted_sum(tokenizer):
    from distill.student.tiny import tiny_llama

    model = tiny_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=0)
    data = tokenize_records(ROWS, tokenizer, DataSettings(train_file="x", step_by_step_label_weight=0.25), "x")
    batch = collate(data.examples, tokenizer.pad_token_id)
    module = StudentWithObjective(model, LossSettings(terms={"ce": 1.0}, chunk_size=7), len(tokenizer))
    weighted = module(batch["input_ids"], batch["attention_mask"], batch["labels"], loss_weights=batch["loss_weights"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    per_token = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=-100)
    expected = (per_token.sum(1) * batch["loss_weights"]).sum()
    assert torch.allclose(weighted["ce"], expected, rtol=1e-5)
    ones = module(batch["input_ids"], batch["attention_mask"], batch["labels"], loss_weights=torch.ones(len(data)))[
        "ce"
    ]
    assert torch.allclose(ones, per_token.sum(), rtol=1e-5)
    assert torch.allclose(ones, module(batch["input_ids"], batch["attention_mask"], batch["labels"])["ce"])
    assert int(target_positions(batch["labels"]).sum()) == int((batch["labels"][:, 1:] != -100).sum())


def train_config(tmp_path: Path, model_dirs, data_file: Path, name: str, **over):
    from distill.training.train import TrainConfig

    tree = {
        "output_dir": str(tmp_path / name),
        "report_to": ["none"],
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 1,
        "eval_steps": None,
        "save_steps": 1000,
        "seed": 3,
        "model": {"student": str(model_dirs["student"])},
        "data": {"train_file": str(data_file), "eval_fraction": 0.0, "step_by_step_label_weight": 0.25},
        "loss": {"terms": {"ce": 1.0}},
    }
    return nested_config(TrainConfig, tree, **over)


def test_weighted_step_is_normalised_by_counted_tokens_whatever_the_split(tmp_path, model_dirs):
    from distill.training.train import Distiller

    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    whole = Distiller(train_config(tmp_path, model_dirs, data_file, "whole"))
    split = Distiller(
        train_config(
            tmp_path, model_dirs, data_file, "split", per_device_train_batch_size=1, gradient_accumulation_steps=4
        )
    )
    # The expected value from the definition: sum of weight x token CE over the step, / counted tokens.
    examples = [whole.train_set[i] for i in range(len(whole.train_set))]
    batch = collate(examples, whole.tokenizer.pad_token_id)
    student = whole.module.student
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    per_token = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=-100)
    expected = (per_token.sum(1) * batch["loss_weights"]).sum() / (batch["labels"][:, 1:] != -100).sum()
    a, b = whole.training_step()["loss"], split.training_step()["loss"]
    assert a == pytest.approx(expected.item(), rel=1e-5) and b == pytest.approx(a, rel=1e-5)


def test_step_by_step_refuses_logit_terms(tmp_path, model_dirs):
    with pytest.raises(ConfigError, match="step_by_step_label_weight"):
        train_config(
            tmp_path,
            model_dirs,
            tmp_path / "x.jsonl",
            "x",
            **{"model.teacher": str(model_dirs["teacher"]), "loss.terms": {"ce": 0.5, "forward_kl": 0.5}},
        )


def test_answer_accuracy_is_logged_and_computed_from_the_generations(tmp_path, model_dirs):
    """The trainer's accuracy metric is the one ``answer_accuracy`` gives on the exported weights, it is logged, and
    it is computed from the model's own greedy generations: gold answers set to what the model says for one of two
    questions give exactly 1/2. (Nothing here depends on what a short run happens to memorise: that changes with
    patch releases of the libraries.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.evaluation.metrics import AccuracySettings, answer_accuracy, load_accuracy_set
    from distill.training.train import run
    from kd_core.answers import AnswerExtractor

    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"question": r["prompt"], "answer": "#### " + r["label"]}) + "\n" for r in ROWS))
    cfg = train_config(
        tmp_path,
        model_dirs,
        data_file,
        "acc",
        **{
            "data.step_by_step_label_weight": None,
            "max_steps": 20,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "accuracy.file": str(held),
            "accuracy.max_new_tokens": 12,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
        },
    )
    summary = run(cfg).summary
    metrics = [json.loads(line) for line in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses  # two rows at lr 1e-2: the run trains
    final = tmp_path / "acc" / "final"
    model, tok = AutoModelForCausalLM.from_pretrained(final).eval(), AutoTokenizer.from_pretrained(final)
    settings = AccuracySettings(file=str(held), max_new_tokens=12)
    pairs = load_accuracy_set(settings)
    exported = answer_accuracy(model, tok, pairs, settings)
    assert exported["answer_questions"] == 2
    assert summary["final_eval"]["eval/answer_accuracy"] == exported["answer_accuracy"]
    assert metrics[-1]["eval/answer_accuracy"] == exported["answer_accuracy"]
    # The whole first generated line is the answer, compared as text; gold = the model's own line for question 0.
    own = AccuracySettings(
        file=str(held), max_new_tokens=12, extractor=AnswerExtractor("regex", r"\A\s*(?P<answer>[^\n]+)", numeric=False)
    )
    first_line = own_first_line(model, tok, pairs[0][0], own)
    assert first_line, "the trained model must generate some text for this test"
    own_pairs = [(pairs[0][0], first_line), (pairs[1][0], first_line + " and more")]
    assert answer_accuracy(model, tok, own_pairs, own)["answer_accuracy"] == 0.5


def own_first_line(model, tokenizer, prompt: str, settings) -> str | None:
    """What ``settings``' extractor finds in the model's greedy answer to ``prompt`` alone (no batch padding)."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    out = model.generate(
        torch.tensor([list(ids)]),
        do_sample=False,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    return settings.extractor.extract(text)


def test_documented_step_by_step_command_parses():
    """The `distill train` command of docs/cot_lion.md (its data_gen commands are run by test_cot/test_lion)."""
    import re
    import shlex

    from distill.training.train import TrainConfig
    from kd_core.config import parse_command_line

    doc = (REPO_ROOT / "docs" / "cot_lion.md").read_text()
    command = re.search(r"distill train (.*?)\n```", doc, re.S).group(1).replace("\\\n", " ")
    cfg = parse_command_line(TrainConfig, shlex.split(command), "distill train")
    assert cfg.data.step_by_step_label_weight == 0.5 and cfg.accuracy.prompt_prefix == "[rationale] "
