"""The student as the teacher's speculative-decoding draft: figures in range, lossless assisted output, and the
figures in ``distill eval --teacher`` output."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.evaluation.speculative import DraftSettings, draft_metrics, expected_tokens_per_round
from kd_core.generation import encode_prompt, generate_tokens
from kd_recipes.cli import distill_main as cli

PROMPTS = ["What is 12 plus 7?", "Tom has 3 apples", "List three colors:", "Write a short poem about the sea."]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_figures_in_range_and_assisted_output_is_the_teachers_greedy_output(model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["teacher"])
    teacher, student = load(model_dirs["teacher"]), load(model_dirs["student"])
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    figures = draft_metrics(student, teacher, prompts, 12, pad, eos)
    assert figures["draft_prompts"] == len(PROMPTS)
    assert 0.0 <= figures["acceptance_rate"] <= 1.0
    assert 1.0 <= figures["tokens_per_teacher_pass"] <= 12
    assert figures["speedup"] > 0 and figures["plain_seconds"] > 0 and figures["assisted_seconds"] > 0
    assert figures["assisted_equal"] == 1.0  # greedy assisted decoding is lossless
    # Drafts counted where the teacher reads them equal the student's passes when the two share a tokenizer.
    assert figures["draft_tokens_proposed"] == figures["student_passes"] > 0
    # ... and the plain run it compares with is the teacher's greedy output of the library's own generation loop.
    for prompt in prompts:
        plain = generate_tokens(teacher, [prompt], pad_token_id=pad, eos_token_ids=[eos], max_new_tokens=12)[0]
        assisted = teacher.generate(
            input_ids=torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=pad,
            eos_token_id=eos,
            assistant_model=student,
        )[0, len(prompt) :]
        assert assisted.tolist()[: len(plain.tokens)] == plain.tokens


def test_a_draft_equal_to_the_teacher_is_mostly_accepted_and_a_random_one_is_not(model_dirs):
    """The teacher drafting for itself keeps most drafts (not all: a random tiny model's logits are near ties, and
    verifying two tokens in one pass rounds differently from one at a time); the random student keeps far fewer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["teacher"])
    teacher, itself, student = load(model_dirs["teacher"]), load(model_dirs["teacher"]), load(model_dirs["student"])
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS[:2]]
    eos = tokenizer.eos_token_id
    # An EOS id outside the vocabulary: every generation runs to max_new_tokens, so no round stops early.
    own = draft_metrics(itself, teacher, prompts, 16, eos, len(tokenizer) + 10)
    other = draft_metrics(student, teacher, prompts, 16, eos, len(tokenizer) + 10)
    assert own["acceptance_rate"] >= 0.6 and own["tokens_per_teacher_pass"] > 1.5
    assert other["acceptance_rate"] < own["acceptance_rate"] - 0.3
    assert own["assisted_equal"] == other["assisted_equal"] == 1.0


def test_eval_command_reports_draft_figures(model_dirs, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "some answer"}) + "\n" for p in PROMPTS))
    out = tmp_path / "figures.json"
    code = cli(
        [
            "eval",
            str(model_dirs["student"]),
            "--data",
            str(data),
            "--teacher",
            str(model_dirs["teacher"]),
            "--max_new_tokens",
            "4",
            "--draft.num_prompts",
            "3",
            "--draft.max_new_tokens",
            "10",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    figures = json.loads(out.read_text())
    assert figures["draft_prompts"] == 3
    assert 0.0 <= figures["acceptance_rate"] <= 1.0 and figures["speedup"] > 0
    assert figures["assisted_equal"] == 1.0
    table = capsys.readouterr().out
    assert "acceptance_rate" in table and "speedup" in table
    # Without a teacher, or with num_prompts 0, there are no draft figures.
    out2 = tmp_path / "no_draft.json"
    cli(
        [
            "eval",
            str(model_dirs["student"]),
            "--data",
            str(data),
            "--teacher",
            str(model_dirs["teacher"]),
            "--max_new_tokens",
            "4",
            "--draft.num_prompts",
            "0",
            "--output",
            str(out2),
        ]
    )
    assert "acceptance_rate" not in json.loads(out2.read_text())


def test_settings_are_validated():
    with pytest.raises(ValueError, match="num_prompts"):
        DraftSettings(num_prompts=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DraftSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="gamma"):
        DraftSettings(gamma=0)


def test_expected_tokens_per_round_is_leviathans_closed_form():
    for alpha in (0.0, 0.13, 0.5, 0.9, 0.999):
        for gamma in (1, 3, 5, 8):
            assert expected_tokens_per_round(alpha, gamma) == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha))
    assert expected_tokens_per_round(1.0, 5) == 6.0  # the closed form's limit: every draft kept, plus one
    assert expected_tokens_per_round(0.0, 5) == 1.0  # nothing kept: the teacher's own token only
    assert expected_tokens_per_round(1.0 + 1e-9, 3) == 4.0  # float sums just above 1 are clamped, not refused
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_round(1.5, 3)
    with pytest.raises(ValueError, match="gamma"):
        expected_tokens_per_round(0.5, 0)


def test_a_model_as_its_own_draft_has_alpha_one_and_gamma_plus_one_tokens_per_round(model_dirs, tmp_path):
    """alpha comes from the eval pass alone (no draft prompts here): the teacher against itself has total variation
    0 on every token, so alpha is 1 and a round of gamma drafts yields gamma + 1 tokens; a random student is below."""
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "some answer"}) + "\n" for p in PROMPTS))
    figures = {}
    for name in ("teacher", "student"):
        out = tmp_path / f"{name}.json"
        argv = ["eval", str(model_dirs[name]), "--data", str(data), "--teacher", str(model_dirs["teacher"])]
        argv += ["--max_new_tokens", "2", "--draft.num_prompts", "0", "--draft.gamma", "4", "--output", str(out)]
        assert cli(argv) == 0
        figures[name] = json.loads(out.read_text())
    own = figures["teacher"]
    assert own["alpha"] == pytest.approx(1.0, abs=1e-6)
    assert own["expected_tokens_per_round"] == pytest.approx(5.0, abs=1e-5)
    assert own["draft_gamma"] == 4 and "acceptance_rate" not in own  # nothing was generated for it
    other = figures["student"]
    assert 0.0 <= other["alpha"] < 0.99
    assert 1.0 <= other["expected_tokens_per_round"] < own["expected_tokens_per_round"]
