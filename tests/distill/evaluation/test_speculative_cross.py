"""The student as the teacher's draft across tokenizers (universal assisted generation): the draft figures in range,
the assisted output equal to the teacher's plain greedy output, and ``distill eval --teacher`` reporting them while
it says why the one-vocabulary figures are skipped."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.evaluation.speculative import draft_metrics
from kd_core.generation import encode_prompt, generate_tokens
from kd_recipes.cli import distill_main as cli
from tests.conftest import CORPUS

PROMPTS = ["What is 12 plus 7?", "Tom has 3 apples", "List three colors:", "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def cross_dirs(tmp_path_factory):
    """A 4-layer teacher with a SentencePiece-style tokenizer (multi-digit numbers, BOS, byte fallback) and a 2-layer
    student with a byte-level one (digit by digit): unlike vocabularies of unlike sizes."""
    from distill.student.tiny import tiny_llama, train_sentencepiece_style_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("cross")
    pairs = {
        "teacher": (train_sentencepiece_style_tokenizer(CORPUS, vocab_size=420), 64, 4),
        "student": (train_tokenizer(CORPUS, vocab_size=300, individual_digits=True), 32, 2),
    }
    dirs = {}
    for name, (tokenizer, hidden, layers) in pairs.items():
        dirs[name] = root / name
        tiny_llama(len(tokenizer), hidden_size=hidden, num_layers=layers, seed=layers).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


def test_cross_tokenizer_draft_is_lossless_and_its_figures_in_range(cross_dirs, monkeypatch):
    teacher_tok, student_tok = (AutoTokenizer.from_pretrained(cross_dirs[n]) for n in ("teacher", "student"))
    assert teacher_tok.get_vocab() != student_tok.get_vocab()
    teacher, student = (AutoModelForCausalLM.from_pretrained(cross_dirs[n]).eval() for n in ("teacher", "student"))
    prompts = [encode_prompt(teacher_tok, p) for p in PROMPTS]
    # An independent count of the drafts: the candidates transformers' own generator hands the teacher each round.
    from transformers.generation import candidate_generator

    generator = candidate_generator.AssistedCandidateGeneratorDifferentTokenizers
    handed, get_candidates = [], generator.get_candidates

    def counted(self, input_ids, **kwargs):
        candidates, logits = get_candidates(self, input_ids, **kwargs)
        handed.append(candidates.shape[1] - input_ids.shape[1])
        return candidates, logits

    monkeypatch.setattr(generator, "get_candidates", counted)
    eos = teacher_tok.eos_token_id
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else eos
    figures = draft_metrics(
        student, teacher, prompts, 12, pad, eos, tokenizer=teacher_tok, assistant_tokenizer=student_tok
    )
    assert figures["draft_tokenizer"] == "teacher's and student's"
    assert figures["student_passes"] > 0 and figures["draft_tokens_proposed"] > 0  # the student did draft
    assert figures["draft_tokens_proposed"] == sum(handed)  # counted at the teacher's inputs, in its own tokens
    # Random tiny models rarely agree (and their greedy outputs are rarely the canonical tokenization that the
    # re-encoded drafts take), so the rate is only bounded here; it is exact by the count above.
    assert 0.0 <= figures["acceptance_rate"] <= 1.0
    assert 1.0 <= figures["tokens_per_teacher_pass"] <= 12
    assert figures["speedup"] > 0
    assert figures["assisted_equal"] == 1.0  # greedy assisted decoding is lossless across tokenizers too
    # The plain run it compares with is the teacher's greedy output of the library's own generation loop.
    for prompt in prompts[:2]:
        plain = generate_tokens(teacher, [prompt], pad_token_id=pad, eos_token_ids=[eos], max_new_tokens=12)[0]
        assisted = teacher.generate(
            input_ids=torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=pad,
            eos_token_id=eos,
            assistant_model=student,
            tokenizer=teacher_tok,
            assistant_tokenizer=student_tok,
        )[0, len(prompt) :]
        assert assisted.tolist()[: len(plain.tokens)] == plain.tokens


def test_eval_with_a_cross_tokenizer_teacher_skips_kl_and_reports_the_draft(cross_dirs, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "some answer 19"}) + "\n" for p in PROMPTS))
    out = tmp_path / "figures.json"
    argv = ["eval", str(cross_dirs["student"]), "--data", str(data), "--teacher", str(cross_dirs["teacher"])]
    argv += ["--max_new_tokens", "4", "--draft.num_prompts", "3", "--draft.max_new_tokens", "10"]
    assert cli([*argv, "--output", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["kl"] is None and figures["top1_agreement"] is None and figures["alpha"] is None
    assert figures["expected_tokens_per_round"] is None
    assert figures["teacher_token_figures"].startswith("skipped: the teacher's tokenizer differs")
    assert figures["perplexity"] > 0  # the model's own figures are still there
    assert figures["draft_prompts"] == 3 and figures["draft_tokenizer"] == "teacher's and student's"
    assert 0.0 <= figures["acceptance_rate"] <= 1.0 and figures["speedup"] > 0
    assert figures["tokens_per_teacher_pass"] >= 1.0 and figures["assisted_equal"] == 1.0
    printed = capsys.readouterr().out
    assert "teacher_token_figures: skipped" in printed and "acceptance_rate" in printed


def test_unlike_tokenizers_with_equal_vocab_sizes_skip_the_draft_with_a_reason(cross_dirs, tmp_path, capsys):
    """transformers 5.24 takes equal ``vocab_size`` for one tokenizer and refuses the two tokenizers then: a student
    whose embedding is padded to the teacher's size gets its draft figures skipped with the reason, not an error."""
    from distill.student.tiny import tiny_llama

    teacher_vocab = AutoModelForCausalLM.from_pretrained(cross_dirs["teacher"]).config.vocab_size
    padded = tmp_path / "padded_student"
    tiny_llama(teacher_vocab, hidden_size=32, num_layers=2).save_pretrained(padded)
    AutoTokenizer.from_pretrained(cross_dirs["student"]).save_pretrained(padded)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "an answer"}) + "\n" for p in PROMPTS[:2]))
    out = tmp_path / "figures.json"
    argv = ["eval", str(padded), "--data", str(data), "--teacher", str(cross_dirs["teacher"]), "--max_new_tokens", "2"]
    assert cli([*argv, "--draft.num_prompts", "1", "--output", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["draft_figures"].startswith(
        f"skipped: the tokenizers differ but both models have vocab_size {teacher_vocab}"
    )
    assert "acceptance_rate" not in figures and figures["kl"] is None
    assert "draft_figures: skipped" in capsys.readouterr().out
