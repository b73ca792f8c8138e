"""Where generated ids lie in their text (:mod:`kd_core.token_text`), on the real SmolLM2 tokenizer (byte-level BPE:
a word's leading space is in its token, characters outside the merges are several byte tokens) and on the test
tokenizer: a span's tokens take in the whitespace the span's text stripped, the byte pieces of a character that
begins it, and nothing else; a span whose edge falls inside a token holding other text has no tokens."""

from __future__ import annotations

import pytest

from kd_core.token_text import completion_offsets, covering_tokens


def spell(tokenizer, text: str, span: str, occurrence: int = 0):
    """(ids, decoded text, offsets, tokens [a, b) of the ``occurrence``-th ``span`` in ``text``, or None)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded, offsets = completion_offsets(tokenizer, [], ids)
    assert decoded == text and offsets[-1][1] == len(text)
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(span, start + 1)
    return ids, decoded, offsets, covering_tokens(decoded, offsets, start, start + len(span))


@pytest.mark.parametrize("which", ["smollm2", "tiny"])
def test_leading_space_and_trailing_newline_are_in_the_edge_tokens(which, smollm2_tokenizer, tokenizer):
    tok = smollm2_tokenizer if which == "smollm2" else tokenizer
    text = "Example 1\nInput: none\nOutput: the answer is blue\nExample 2"
    ids, decoded, offsets, (a, b) = spell(tok, text, "the answer is blue")
    assert tok.decode(ids[a:b]) == " the answer is blue"  # the space before 'the' is in its token: the row stripped it
    assert decoded[offsets[a - 1][0] : offsets[a - 1][1]].endswith(":") and decoded[offsets[b][0]] == "\n"


def test_multi_byte_characters_at_both_edges(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Output: 🙂 東京 is far ✓\nExample 2"
    ids, decoded, offsets, (a, b) = spell(tok, text, "🙂 東京 is far ✓")
    assert tok.decode(ids[a:b]) == " 🙂 東京 is far ✓"
    # The emoji is several byte tokens: all but the last decode to nothing, and the slice starts at the first.
    assert any(s == e for s, e in offsets[a:b]) and offsets[a][0] <= text.index("🙂")
    assert tok.decode(ids[a + 1 : b]) != tok.decode(ids[a:b])[1:]  # without its first piece the emoji is broken
    # The text after the emoji begins at the token after the emoji's last piece.
    _, _, _, (c, d) = spell(tok, text, "東京 is far ✓")
    assert tok.decode(ids[c:d]).strip() == "東京 is far ✓" and d == b


def test_an_edge_inside_a_token_with_other_text_has_no_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert spell(tok, 'Output:"quoted"\n', '"quoted"')[3] is None  # the first token, ':"', holds the colon
    assert spell(tok, "Output: helpfulness\n", "helpfulnes")[3] is None  # the last token, 'ness', holds an 's'
    ids, _, _, (a, b) = spell(tok, 'Output: "quoted words"\n', "quoted words")  # ' "' and '"' are tokens apart
    assert tok.decode(ids[a:b]) == "quoted words"
    assert covering_tokens("ab", [(0, 1), (1, 2)], 1, 1) is None  # an empty span


def test_offsets_after_a_context(smollm2_tokenizer):
    """Ids decoded after a context (as the cross-tokenizer path decodes a sampled completion): their offsets cover
    the text they add, not the context's."""
    tok = smollm2_tokenizer
    prompt = tok("Say it:", add_special_tokens=False)["input_ids"]
    ids = tok(" hello there", add_special_tokens=False)["input_ids"]
    text, offsets = completion_offsets(tok, prompt, ids)
    assert text == " hello there" and offsets[-1][1] == len(text) and offsets[0] == (0, len(" hello"))
