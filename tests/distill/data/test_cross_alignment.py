"""Cross-tokenizer alignment (distill/data/cross.py) on two unlike tokenizers built here: the student's a byte-level
BPE writing numbers digit by digit (Llama-3 / Qwen style), the teacher's a SentencePiece-style BPE (``▁`` spaces,
byte fallback, multi-digit numbers, a BOS on every sequence). The known traps, one test each."""

from __future__ import annotations

import pytest

from distill.data.cross import (
    align,
    collate_teacher,
    cross_columns,
    encode,
    match_vocabularies,
    segments,
    splits_digits,
    teacher_encode,
    token_texts,
)
from distill.data.datasets import IGNORE_INDEX, DataSettings, tokenize_example, tokenize_records
from kd_core.config import ConfigError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 7? The answer is 19.",
    "Tom has 345 apples and 1200 pears, so he has 1545 fruits.",
    "hello world, the cafe costs 5 euros.",
] * 20


@pytest.fixture(scope="module")
def student_tok():
    from distill.student.tiny import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300, individual_digits=True)


@pytest.fixture(scope="module")
def teacher_tok():
    from distill.student.tiny import train_sentencepiece_style_tokenizer

    return train_sentencepiece_style_tokenizer(CORPUS, vocab_size=420)


def _pairs(text, student_tok, teacher_tok, max_length=512):
    """Aligned pairs of a text example, as (student prefix read, teacher prefix read) strings, plus the encodings."""
    record = {"text": text}
    example = tokenize_example(record, "text", student_tok, max_length, True)
    columns = cross_columns(record, "text", example, _counted(example), student_tok, teacher_tok, max_length, "row 1")
    _, s_off = encode(segments(record, "text", student_tok), student_tok)
    _, t_off = encode(segments(record, "text", teacher_tok), teacher_tok)
    pairs = list(zip(columns["align_student"], columns["align_teacher"]))
    return pairs, s_off, t_off, example, columns


def _counted(example):
    return [label != IGNORE_INDEX for label in example["labels"]]


def _read(text, offsets, i):
    return text[: offsets[i][1]]


def test_aligned_positions_have_read_the_same_text(student_tok, teacher_tok):
    text = "Tom has 345 apples and 1200 pears."
    pairs, s_off, t_off, example, columns = _pairs(text, student_tok, teacher_tok)
    assert len(pairs) >= 6
    for i, j in pairs:
        assert _read(text, s_off, i) == _read(text, t_off, j)
        assert example["labels"][i + 1] != IGNORE_INDEX
    # every shared prefix end whose student position predicts a counted label is used, each once
    assert len({i for i, _ in pairs}) == len(pairs) and len({j for _, j in pairs}) == len(pairs)


def test_numbers_split_digit_by_digit_align_only_at_their_boundaries(student_tok, teacher_tok):
    text = "Tom has 345 apples."
    pairs, s_off, t_off, example, columns = _pairs(text, student_tok, teacher_tok)
    student_tokens = student_tok.convert_ids_to_tokens(example["input_ids"])
    teacher_tokens = teacher_tok.convert_ids_to_tokens(columns["teacher_input_ids"])
    assert [t for t in student_tokens if t in "345"] == ["3", "4", "5"]  # digit by digit
    assert any("345" in t for t in teacher_tokens)  # one multi-digit token
    read = [_read(text, s_off, i) for i, _ in pairs]
    assert "Tom has 3" not in read and "Tom has 34" not in read  # inside the number: no teacher boundary
    assert "Tom has 345" in read  # after it: both predict what follows the number
    assert "Tom has" in read  # before it (the student's space token and the teacher's ▁345 differ, the prefix not)


def test_leading_space_markers_and_byte_fallback(student_tok, teacher_tok):
    text = "hello world, caf\u00e9 \u20ac5"
    pairs, s_off, t_off, example, columns = _pairs(text, student_tok, teacher_tok)
    read = {_read(text, s_off, i): (i, j) for i, j in pairs}
    assert "hello" in read  # the teacher's next token carries the space (▁world), the student's a separate Ġ
    teacher_tokens = teacher_tok.convert_ids_to_tokens(columns["teacher_input_ids"])
    euro = [k for k, t in enumerate(teacher_tokens) if t in ("<0xE2>", "<0x82>", "<0xAC>")]
    assert len(euro) == 3  # the euro sign falls back to three byte pieces with the same offsets
    assert len({t_off[k] for k in euro}) == 1
    aligned_teacher = {j for _, j in pairs}
    assert euro[0] not in aligned_teacher and euro[1] not in aligned_teacher  # a byte piece has read part of it
    assert read["hello world, caf\u00e9 \u20ac"][1] == euro[2]  # after the last piece, the whole sign is read


def test_special_tokens_bos_eos_and_the_chat_template(student_tok, teacher_tok):
    pairs, s_off, t_off, example, columns = _pairs("Tom has 345 apples.", student_tok, teacher_tok)
    teacher_ids = columns["teacher_input_ids"]
    assert teacher_ids[0] == teacher_tok.bos_token_id and t_off[0] == (0, 0)  # the teacher adds a BOS
    assert example["input_ids"][0] != student_tok.bos_token_id  # the student does not
    # The position that predicts the appended EOS is aligned on both sides (a zero-width EOS adds no text).
    last_i, last_j = pairs[-1]
    assert example["input_ids"][last_i + 1] == student_tok.eos_token_id
    assert teacher_ids[last_j + 1] == teacher_tok.eos_token_id
    # Chat data: both read the student's rendering; the template's special tokens are single tokens in both.
    record = {"prompt": "What is 12 plus 7?", "completion": "The answer is 19."}
    example = tokenize_example(record, "prompt_completion", student_tok, 512, True)
    columns = cross_columns(
        record, "prompt_completion", example, _counted(example), student_tok, teacher_tok, 512, "row 1"
    )
    ((text, _),) = segments(record, "prompt_completion", student_tok)[0]
    _, s_off = encode(segments(record, "prompt_completion", student_tok), student_tok)
    _, t_off = teacher_encode(segments(record, "prompt_completion", student_tok), teacher_tok)
    assert columns["teacher_input_ids"][0] == teacher_tok.bos_token_id  # the rendering has none: the teacher's added
    pairs = list(zip(columns["align_student"], columns["align_teacher"]))
    first_target = min(k for k, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert pairs[0][0] == first_target - 1  # the position after "<|assistant|>\n" predicts the answer's first token
    assert text[: s_off[pairs[0][0]][1]].endswith("<|assistant|>\n")
    for i, j in pairs:
        assert text[: s_off[i][1]] == text[: t_off[j][1]]


def test_truncation_cuts_the_two_sequences_at_different_places(student_tok, teacher_tok):
    text = "Tom has 345 apples and 1200 pears, so he has 1545 fruits."
    full, s_off, t_off, _, _ = _pairs(text, student_tok, teacher_tok)
    cut, _, _, example, columns = _pairs(text, student_tok, teacher_tok, max_length=10)
    n_s, n_t = len(example["input_ids"]), len(columns["teacher_input_ids"])
    assert n_s == n_t == 10
    assert s_off[n_s - 1][1] != t_off[n_t - 1][1]  # the same token budget covers different text
    # Exactly the full alignment's pairs that both truncated sequences still hold, the student's with a next label.
    assert cut == [(i, j) for i, j in full if i + 1 < n_s and j < n_t]
    assert cut and max(t_off[j][1] for _, j in cut) <= min(s_off[n_s - 1][1], t_off[n_t - 1][1])


def test_the_dataset_and_batch_carry_the_teacher_tokens(student_tok, teacher_tok, tmp_path):
    rows = [{"prompt": f"What is {i} plus 7?", "completion": f"The answer is {i + 7}."} for i in range(5)]
    dataset = tokenize_records(rows, student_tok, DataSettings(train_file="x"), "x", teacher_tokenizer=teacher_tok)
    from distill.data.datasets import collate

    batch = collate(list(dataset), student_tok.pad_token_id)
    assert batch["teacher_input_ids"].shape[0] == 5 and batch["teacher_attention_mask"].sum() > 0
    pairs = batch["cross_pairs"]
    assert pairs.shape[1] == 3 and len(pairs) == sum(len(e["align_student"]) for e in dataset)
    assert bool((batch["labels"][pairs[:, 0], pairs[:, 1] + 1] != IGNORE_INDEX).all())
    assert bool((batch["teacher_attention_mask"][pairs[:, 0], pairs[:, 2]] == 1).all())
    empty = collate_teacher([{"teacher_input_ids": [1, 2], "align_student": [], "align_teacher": []}])
    assert empty["cross_pairs"].shape == (0, 3)


def test_gold_matches_texts_one_to_one_and_leaves_digits_out_when_splitting_differs(student_tok, teacher_tok):
    s_ids, t_ids = match_vocabularies(student_tok, teacher_tok)
    s_texts, t_texts = token_texts(student_tok), token_texts(teacher_tok)
    assert len(s_ids) == len(set(s_ids)) == len(t_ids) == len(set(t_ids)) > 20
    for s, t in zip(s_ids, t_ids):
        assert s_texts[s] == t_texts[t]
    matched = {s_texts[s] for s in s_ids}
    assert " the" in matched  # Ġthe and ▁the are the same text
    assert splits_digits(s_texts) and not splits_digits(t_texts)
    assert not any(c.isdigit() for text in matched for c in text)  # "1" means different things on each side
    special = set(student_tok.all_special_ids)
    assert not special & set(s_ids)
    same_policy = match_vocabularies(student_tok, student_tok)
    assert any(student_tok.convert_ids_to_tokens(i).isdigit() for i in same_policy[0])


def test_gold_without_shared_strings_is_refused(student_tok):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["\u03b1\u03b2\u03b3 \u03b4\u03b5\u03b6 \u03b7\u03b8"] * 10,
        trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"], show_progress=False),
    )
    greek = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with pytest.raises(ConfigError, match=r"loss\.cross_tokenizer: gold found no token whose text is the same"):
        match_vocabularies(student_tok, greek)


def test_alignment_by_hand():
    # student "ab|c|d", teacher "a|bc|d": prefixes "abc" and "abcd" are shared; "ab" and "a" are not
    student = [(0, 2), (2, 3), (3, 4)]
    teacher = [(0, 0), (0, 1), (1, 3), (3, 4)]
    assert align(student, teacher, [True, True, True]) == ([1], [2])
    assert align(student, teacher, [True, False, False]) == ([], [])
