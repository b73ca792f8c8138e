"""Where generated token ids lie in their text: each token's character span, and the tokens that spell a span.

Two stages need it. ``distill`` decodes a student's sampled tokens to give them to a teacher with another tokenizer
(:mod:`distill.data.cross`); ``data-gen self-instruct`` finds the tokens of one instance's output inside the
teacher's answer, so that the log-probabilities captured for those tokens can train on that row alone
(:mod:`data_gen.logprobs`).

The text is decoded incrementally (tokenizers' ``DecodeStream``, one pass over the ids): a token adds what its
decoding adds after the tokens before it, so the pieces join to the whole decoded text, a SentencePiece ``▁`` keeps
its space after a context, and a piece of a UTF-8 character gets a zero-width span until the piece that completes the
character. Special tokens are decoded as their text (``<|im_end|>``): they have a width, so a span never takes them in
by accident.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def completion_offsets(
    tokenizer: Any, prompt: Sequence[int], completion: Sequence[int]
) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``completion`` tokens as they read after ``prompt`` (which only gives context: its text is not
    part of the result), and each token's character span in it (see the module docstring)."""
    from tokenizers.decoders import DecodeStream

    backend = tokenizer.backend_tokenizer
    stream = DecodeStream(skip_special_tokens=False)
    if prompt:
        stream.step(backend, list(prompt))
    pieces, offsets, end = [], [], 0
    for token in completion:
        chunk = stream.step(backend, token) or ""
        pieces.append(chunk)
        offsets.append((end, end + len(chunk)))
        end += len(chunk)
    return "".join(pieces), offsets


def covering_tokens(text: str, offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The tokens ``[a, b)`` that spell ``text[start:end]`` (non-empty) and nothing else but whitespace at its edges:
    the first token may begin with whitespace before ``start`` (a leading space carried by a word's token) and the
    last may end with whitespace after ``end`` (``.\\n``); None when a token at an edge also holds other text (the
    span does not fall on token boundaries). ``offsets`` are :func:`completion_offsets`' spans of ``text``."""
    if not 0 <= start < end <= len(text):
        return None
    first = next((i for i, (_, e) in enumerate(offsets) if e > start), None)
    last = next((i for i, (_, e) in enumerate(offsets) if e >= end), None)
    if first is None or last is None:
        return None
    begin = offsets[first][0]
    # The leading bytes of a multi-byte character decode to nothing until its last byte: they belong to the slice.
    while first > 0 and offsets[first - 1] == (begin, begin):
        first -= 1
    if text[begin:start].strip() or text[end : offsets[last][1]].strip():
        return None
    return first, last + 1
