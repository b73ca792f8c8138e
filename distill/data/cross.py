"""The teacher's own tokenization of each example, and which positions of the two sequences are compared.

Cross-tokenizer distillation (``loss.cross_tokenizer``) gives the teacher the same TEXT as the student, tokenized by
the teacher's tokenizer, and compares the two models where both predict the continuation of the same text.

**The text.** Each example is rendered once as the student's tokenization renders it (:func:`segments`: plain text,
prompt then completion, or the chat template's output, with the same special-token settings), and both tokenizers
encode those segments with character offsets (fast tokenizers' ``return_offsets_mapping``). An EOS the data layer
appends after the text gets the zero-width offset ``(len, len)``; so do special tokens a tokenizer adds itself (BOS).
The student's ids re-encoded this way must equal the example's ids, else the example cannot be aligned (ConfigError).

**Aligned positions.** The model at position ``i`` has read the text up to the END offset of token ``i`` and predicts
what follows. Student position ``i`` and teacher position ``j`` are aligned when both have read exactly the same
prefix: ``end_s[i] == end_t[j]``, taking for each end offset the LAST token of each sequence that ends there and has a
width (the byte pieces of one character share its offsets: only the last has read it all), else a zero-width one (a
BOS at the start; a zero-width EOS after a real token adds no text, so it never replaces it). Only student positions
whose next token is a counted label are kept. Consequences, each tested: inside a number that one tokenizer splits
digit by digit and the other keeps whole, only the boundaries before and after the number align; a leading space
carried by the next token (``Ġworld``, ``▁world``) or dropped (WordPiece) changes nothing, since only the prefix read
counts; byte-fallback pieces of one character align only after the character's last byte; sequences truncated at
different places align only where both still have the text.

**Sampled completions** (on-policy, :func:`sampled_columns`): the prompt is the dataset's (the teacher's own tokens of
its rendering, ``teacher_prompt_ids``); the student's sampled tokens are decoded after it with each token's character
span and encoded by the teacher; offsets then count from the end of the prompt, and positions align by the same rule.

**Matched tokens** (``gold``): :func:`match_vocabularies` pairs the ids whose text is the same in both vocabularies
and unique within each (text = what the token adds after a plain letter, so ``Ġthe``, ``▁the`` and a WordPiece
``the`` are all `` the``); special tokens and partial UTF-8 byte pieces are never matched. When one tokenizer splits
numbers digit by digit and the other has multi-digit tokens, tokens with digits are left unmatched: the digit-wise
``1`` means "a number starting with 1", the other's ``1`` "the number 1", and comparing them exactly misleads the
student (the X-Token paper's GSM8K failure of GOLD); they go to the ULD part.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from kd_core.config import ConfigError
from kd_core.token_text import completion_offsets

CROSS_FEATURES = {
    "teacher_input_ids": ("list", "int32"),
    "align_student": ("list", "int32"),
    "align_teacher": ("list", "int32"),
    "teacher_prompt_ids": ("list", "int32"),
}
IGNORE_LABEL = -100  # distill.data.datasets.IGNORE_INDEX (that module imports this one)
PROMPT_IDS = "teacher_prompt_ids"  # the teacher's tokens of the prompt alone: what on-policy samples continue
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
Segments = tuple[list[tuple[str, bool]], bool]  # [(text, add_special_tokens)], whether an EOS follows


def check_offsets(tokenizer: PreTrainedTokenizerBase, field: str) -> None:
    """A tokenizer that gives character offsets, else one ConfigError naming ``field``."""
    if not tokenizer.is_fast:
        raise ConfigError(
            f"{field}: {type(tokenizer).__name__} is a slow (Python) tokenizer without character "
            "offsets; loss.cross_tokenizer aligns the two sequences by offsets and needs a fast "
            "tokenizer (a tokenizer.json, as AutoTokenizer loads by default)"
        )


def check_templates(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, field: str) -> None:
    """The teacher reads the student's rendering of chat data: a teacher trained on another chat template would be
    given text it never saw (and the data's turns would mean different things), so a different template is refused.
    A teacher without a template reads the student's."""
    if teacher.chat_template and student.chat_template and teacher.chat_template != student.chat_template:
        raise ConfigError(
            f"{field}: the teacher's chat template differs from the student's; loss.cross_tokenizer "
            "gives both models the same rendered text, so the templates must be the same (or use "
            "data.format: text, or a teacher tokenizer without a chat template)"
        )


def check_pair(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, fields: tuple[str, str], data_format: str
) -> None:
    """The two tokenizers of a cross-tokenizer run (``fields`` name where each came from): both give offsets and,
    unless the data is plain text, they share the chat template (ConfigError otherwise, one line)."""
    check_offsets(student, fields[0])
    check_offsets(teacher, fields[1])
    if data_format != "text":
        check_templates(student, teacher, fields[1])


def chat_messages(record: dict[str, Any], shape: str) -> list[dict[str, Any]]:
    """The conversation a record of a chat-rendered shape is: its messages, or its prompt as the user's turn (and
    its completion as the assistant's). Here, below the data layer, so that
    :func:`distill.data.datasets.tokenize_example` and :func:`segments` render the same text."""
    if shape == "messages":
        return record["messages"]
    if shape == "prompt":
        return [{"role": "user", "content": record["prompt"]}]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def segments(record: dict[str, Any], shape: str, tokenizer: PreTrainedTokenizerBase) -> Segments:
    """The pieces :func:`distill.data.datasets.tokenize_example` tokenizes for ``record``, as text."""
    if shape == "text":
        return [(record["text"], True)], True
    if tokenizer.chat_template is None and shape in ("prompt_completion", "prompt"):
        if shape == "prompt":
            return [(record["prompt"], True)], False
        return [(record["prompt"], True), (record["completion"], False)], True
    messages = chat_messages(record, shape)
    prompt_only = messages[-1]["role"] != "assistant"
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt_only)
    return [(text, False)], False


def prompt_segments(record: dict[str, Any], shape: str, tokenizer: PreTrainedTokenizerBase) -> Segments | None:
    """The pieces of the prompt a model is given to write the completion (what ``prompt_length`` counts, the chat
    template's generation prompt included); None for ``text``, which has no prompt."""
    if shape == "text":
        return None
    if shape == "prompt_completion":
        return segments({"prompt": record["prompt"]}, "prompt", tokenizer)
    if shape == "messages" and record["messages"][-1]["role"] == "assistant":
        return segments({"messages": record["messages"][:-1]}, "messages", tokenizer)
    return segments(record, shape, tokenizer)


def encode(pieces: Segments, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets (into the concatenated text) of the pieces, with the EOS if one follows."""
    parts, eos = pieces
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    start = 0
    for text, special in parts:
        encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids += encoded["input_ids"]
        offsets += [(start + a, start + b) for a, b in encoded["offset_mapping"]]
        start += len(text)
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        offsets.append((start, start))
    return ids, offsets


def teacher_encode(pieces: Segments, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[tuple[int, int]]]:
    """:func:`encode` for the teacher, starting with the teacher's BOS (zero-width) when its tokenizer adds one and
    the rendering does not: the student's chat template is encoded without special tokens and carries the student's
    own BOS or none, and a model trained with a BOS on every sequence reads text without it badly (Gemma-3)."""
    ids, offsets = encode(pieces, tokenizer)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos] and tokenizer("a")["input_ids"][:1] == [bos]:
        return [bos, *ids], [(0, 0), *offsets]
    return ids, offsets


def _prefix_positions(offsets: list[tuple[int, int]]) -> dict[int, int]:
    """For each prefix end, the position that has read exactly that prefix (see the module docstring)."""
    chosen: dict[int, int] = {}
    for i, (start, end) in enumerate(offsets):
        if end > start or end not in chosen:
            chosen[end] = i
    return chosen


def align(
    student_offsets: list[tuple[int, int]], teacher_offsets: list[tuple[int, int]], counted: list[bool]
) -> tuple[list[int], list[int]]:
    """Aligned positions (module docstring): ``(student_positions, teacher_positions)``, in increasing order; a
    student position ``i`` is kept when the label of token ``i + 1`` is ``counted``."""
    teacher = _prefix_positions(teacher_offsets)
    pairs = sorted(
        (i, teacher[end])
        for end, i in _prefix_positions(student_offsets).items()
        if end in teacher and i + 1 < len(counted) and counted[i + 1]
    )
    return [i for i, _ in pairs], [j for _, j in pairs]


def cross_columns(
    record: dict[str, Any],
    shape: str,
    example: dict[str, Any],
    counted: list[bool],
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    where: str,
) -> dict[str, list[int]]:
    """The teacher's ids (truncated to ``max_length`` tokens) and the aligned positions of one example, whose
    ``counted`` says which of its labels count."""
    pieces = segments(record, shape, tokenizer)
    ids, offsets = encode(pieces, tokenizer)
    n = len(example["input_ids"])
    if ids[:n] != list(example["input_ids"]):
        raise ConfigError(
            f"{where}: re-encoding the example's text with offsets gives other student tokens than the "
            "data layer's; it cannot be aligned with the teacher's tokens (loss.cross_tokenizer)"
        )
    teacher_ids, teacher_offsets = teacher_encode(pieces, teacher_tokenizer)
    teacher_ids, teacher_offsets = teacher_ids[:max_length], teacher_offsets[:max_length]
    student_pos, teacher_pos = align(offsets[:n], teacher_offsets, counted)
    prompt = prompt_segments(record, shape, tokenizer)
    teacher_prompt = teacher_encode(prompt, teacher_tokenizer)[0][:max_length] if prompt is not None else []
    return {
        "teacher_input_ids": teacher_ids,
        "align_student": student_pos,
        "align_teacher": teacher_pos,
        PROMPT_IDS: teacher_prompt,
    }


def sampled_columns(
    example: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> dict[str, list[int]]:
    """The teacher's ids and the aligned positions of a sampled example (on-policy): its prompt in the teacher's
    own tokens (``teacher_prompt_ids``, from the dataset's rendering, as off-policy), then the completion the
    student wrote, decoded to text (:func:`completion_offsets`) and encoded by the teacher after the prompt (as
    the prompt/completion path encodes a completion), a final student EOS becoming the teacher's (zero-width; another
    stop token is decoded as its text, which a teacher sharing the chat template reads as its own special token).
    Offsets count from the end of the prompt, which both sides have read at their last prompt position; positions
    align as :func:`align` says. A pure function of the example: a replayed or resumed sample gets the same."""
    ids, n_prompt = list(example["input_ids"]), example["prompt_length"]
    completion = ids[n_prompt:]
    eos = bool(completion) and completion[-1] == tokenizer.eos_token_id
    text, student_offsets = completion_offsets(tokenizer, ids[:n_prompt], completion[:-1] if eos else completion)
    encoded = teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    teacher_ids, teacher_offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    if eos:
        student_offsets.append((len(text), len(text)))
        if teacher_tokenizer.eos_token_id is not None:
            teacher_ids.append(teacher_tokenizer.eos_token_id)
            teacher_offsets.append((len(text), len(text)))
    prompt = list(example[PROMPT_IDS])
    room = max(0, max_length - len(prompt))
    teacher_ids, teacher_offsets = teacher_ids[:room], teacher_offsets[:room]
    # Relative lists: entry 0 is the last prompt position (it has read the whole prompt: offset 0).
    counted = [label != IGNORE_LABEL for label in example["labels"][n_prompt - 1 :]]
    student_pos, teacher_pos = [], []
    # A prompt cut by max_length (either side) has no end both have read, and leaves no room for a completion.
    if 0 < n_prompt < max_length and 0 < len(prompt) < max_length:
        student_pos, teacher_pos = align([(0, 0), *student_offsets], [(0, 0), *teacher_offsets], counted)
    return {
        "teacher_input_ids": prompt + teacher_ids,
        "align_student": [n_prompt - 1 + i for i in student_pos],
        "align_teacher": [len(prompt) - 1 + j for j in teacher_pos],
        PROMPT_IDS: prompt,
    }


def token_texts(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """The text each ordinary token adds after a plain letter (so a leading-space marker becomes a space, a
    WordPiece ``##`` continuation none); special tokens and pieces of a UTF-8 character are left out."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    backend = tokenizer.backend_tokenizer
    base = backend.decode([probe], skip_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    # SentencePiece byte-fallback pieces (<0x31>) are left out: the tokenizer writes them only for characters it has
    # no token for, and a whole ASCII one decodes like the character's own token ('1'), which would make both
    # non-unique and leave every single-character token (digits, '=', '.') unmatched (Gemma-3).
    special |= {i for i, t in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))) if _BYTE_PIECE.match(t)}
    decoded = backend.decode_batch([[probe, i] for i in range(len(tokenizer))], skip_special_tokens=False)
    texts = {}
    for i, text in enumerate(decoded):
        if i in special or not text.startswith(base):
            continue
        text = text[len(base) :]
        if text and "\ufffd" not in text:
            texts[i] = text
    return texts


def _unique(texts: dict[int, str]) -> dict[str, int]:
    by_text: dict[str, list[int]] = {}
    for i, text in texts.items():
        by_text.setdefault(text, []).append(i)
    return {text: ids[0] for text, ids in by_text.items() if len(ids) == 1}


def splits_digits(texts: dict[int, str]) -> bool:
    """Whether a vocabulary writes every number digit by digit (no token holds two ASCII digits: Gemma-3 splits
    0-9 one by one yet has multi-digit tokens of other scripts, such as Bengali '২০', which GSM8K text never uses)."""
    return not any(sum(c in "0123456789" for c in text) > 1 for text in texts.values())


def match_vocabularies(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, field: str = "loss.cross_tokenizer"
) -> tuple[list[int], list[int]]:
    """``(student_ids, teacher_ids)`` of the tokens whose text maps one to one between the vocabularies (module
    docstring); ConfigError naming ``field`` when none does (``gold`` would then be ``uld``)."""
    s_texts, t_texts = token_texts(student), token_texts(teacher)
    s_unique, t_unique = _unique(s_texts), _unique(t_texts)
    digits_differ = splits_digits(s_texts) != splits_digits(t_texts)
    shared = sorted(
        text for text in s_unique.keys() & t_unique.keys() if not (digits_differ and any(c.isdigit() for c in text))
    )
    if not shared:
        raise ConfigError(
            f"{field}: gold found no token whose text is the same in both vocabularies (student "
            f"{len(student)} tokens, teacher {len(teacher)}); nothing can be compared exactly: use uld"
        )
    return [s_unique[text] for text in shared], [t_unique[text] for text in shared]


def collate_teacher(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Cross-tokenizer distillation: the teacher's own tokens, right-padded (with id 0: padding is masked and
    causal attention never reads it from a real token), and the aligned pairs ``[P, 3]`` = (row, student position,
    teacher position), in row-major order of the student positions."""
    width = max(len(e["teacher_input_ids"]) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    pairs = []
    for row, example in enumerate(examples):
        n = len(example["teacher_input_ids"])
        ids[row, :n] = torch.tensor(example["teacher_input_ids"])
        mask[row, :n] = 1
        pairs += [(row, s, t) for s, t in zip(example["align_student"], example["align_teacher"])]
    return {
        "teacher_input_ids": ids,
        "teacher_attention_mask": mask,
        "cross_pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 3),
    }
