"""Final-answer extraction and normalisation, shared by ``data-gen cot``, ``data-gen lion``, ``distill eval`` and the
trainer's answer-accuracy metric (one implementation, so that "correct" means the same thing when data is filtered and
when a student is evaluated).

:class:`AnswerExtractor` is at once the extractor and its config section: every command that reads answers has an
``extractor`` section of this class (``--extractor.kind``, ``--extractor.regex``, ``--extractor.numeric``; in the
trainer ``--accuracy.extractor.kind`` and so on), so the settings have one shape, one set of defaults and one
validation everywhere.

Extractors (``kind``):

* ``answer_is``: the text after the last "the answer is" (case-insensitive, "So the answer is 42." style);
* ``hash``: the text after the last ``####`` (GSM8K's gold format);
* ``final_number``: the last number in the text;
* ``regex``: a user pattern; its group named ``answer``, else group 1, else the whole match (last match wins).

With ``numeric`` normalisation (the default) the extracted text is reduced to its first number and written in one
canonical form: thousands separators, currency and percent signs and trailing zeros go ("$1,000.50" -> "1000.5",
"18.00" -> "18", "3/4" -> "0.75"), so "72", "72.0" and "$72" all match a gold "72". Without it, answers are compared
case-insensitively after trimming whitespace and a trailing period.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal, get_args

from kd_core.config import ConfigError, option

Kind = Literal["answer_is", "hash", "final_number", "regex"]
KINDS: tuple[str, ...] = get_args(Kind)

# A number as people write it: optional sign, digits with optional thousands commas, optional decimals, or a simple
# fraction. The comma form requires groups of exactly three digits, so "1,2" is read as two numbers, not 12.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"the (?:final )?answer is[:\s]*", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """The first number in ``text`` in canonical decimal form, or None when there is none."""
    match = _NUMBER.search(text.replace("\u2212", "-"))  # a Unicode minus sign is still a minus
    if match is None:
        return None
    raw = match.group(0).replace(",", "")
    try:
        if "/" in raw:
            num, den = raw.split("/")
            if int(den) == 0:
                return None
            value = Decimal(int(num)) / Decimal(int(den))
        else:
            value = Decimal(raw)
    except (InvalidOperation, ValueError):
        return None
    # Integers as int() spells them: exact at any length (a sampling model can write more than Decimal's 28-digit
    # context, where quantize raised); other numbers lose trailing zeros ("0.50" -> "0.5") through normalize().
    text_value = str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")
    return "0" if text_value in ("-0", "0") else text_value


def normalize_text(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


@dataclass
class AnswerExtractor:
    """How the final answer is read from a generated text; ``extract`` returns the normalised answer or None."""

    kind: Kind = option(
        "answer_is", help="answer_is ('So the answer is X'), hash ('#### X'), final_number (the last number), or regex"
    )
    regex: str | None = option(
        None,
        help="kind=regex: the pattern; its group 'answer', else group 1, else the whole match (the last match wins)",
    )
    numeric: bool = option(
        True, help="compare as numbers (drops $ , % and trailing zeros; 3/4 = 0.75); false = as text, case-insensitive"
    )

    def __post_init__(self) -> None:
        # Also run for configs built from YAML or the command line, so a bad kind or pattern fails before any work.
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.numeric, bool):
            raise ValueError(f"numeric: expected true or false, got {self.numeric!r}")
        self._pattern: re.Pattern[str] | None = None
        if self.kind == "regex":
            if not self.regex:
                raise ValueError("regex: kind 'regex' needs a pattern")
            try:
                self._pattern = re.compile(self.regex, re.IGNORECASE | re.MULTILINE)
            except re.error as err:
                raise ValueError(f"regex: {self.regex!r} does not compile ({err})") from None

    def raw(self, text: str) -> str | None:
        """The answer text before normalisation (None when this extractor finds nothing)."""
        if self.kind == "hash":
            _, sep, tail = text.rpartition("####")
            return tail.strip().splitlines()[0] if sep and tail.strip() else None
        if self.kind == "answer_is":
            matches = list(_ANSWER_IS.finditer(text))
            if not matches:
                return None
            tail = text[matches[-1].end() :].strip()
            return tail.splitlines()[0] if tail else None
        if self.kind == "final_number":
            numbers = _NUMBER.findall(text.replace("\u2212", "-"))
            return numbers[-1] if numbers else None
        assert self._pattern is not None
        matches = list(self._pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        if "answer" in last.groupdict():
            return last.group("answer")
        return last.group(1) if last.re.groups else last.group(0)

    def normalize(self, text: str) -> str | None:
        if self.numeric:
            return normalize_number(text)
        value = normalize_text(text)
        return value or None

    def extract(self, text: str) -> str | None:
        found = self.raw(text)
        return None if found is None else self.normalize(found)


def gold_answer(text: str, numeric: bool = True) -> str | None:
    """A gold label: the part after ``####`` when present (GSM8K), else the whole text; normalised."""
    _, sep, tail = text.rpartition("####")
    value = tail if sep else text
    return normalize_number(value) if numeric else (normalize_text(value) or None)


@dataclass(frozen=True)
class QuestionRow:
    """A question read from a user's file: its row, its text and its normalised gold answer (None: none given)."""

    row: int
    question: str
    gold: str | None


def load_questions(
    path: str,
    field: str,
    question_field: str,
    answer_field: str | None,
    *,
    numeric: bool = True,
    require_gold: bool = True,
    limit: int | None = None,
) -> list[QuestionRow]:
    """The questions of ``path`` (any format :func:`kd_core.records.load_records` reads), with their gold answers
    (:func:`gold_answer`), the first ``limit`` only. A row without a question string, or, with ``require_gold``,
    without a usable gold answer, is a ConfigError naming the file, the row and the field (``field`` names the
    setting that gave the file). The one reader behind ``data-gen cot``'s questions and the trainer's and ``distill
    eval``'s accuracy sets."""
    from kd_core.records import load_records

    records = load_records(path, field)
    rows = []
    for row, record in enumerate(records[:limit] if limit is not None else records):
        where = f"{field}: {path}: row {row}"
        question = record.get(question_field)
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: field '{question_field}': expected a non-empty question string")
        raw = record.get(answer_field) if answer_field else None
        gold = gold_answer(str(raw), numeric) if raw is not None and str(raw).strip() else None
        if gold is None and require_gold:
            problem = (
                f"no gold answer in {str(raw)[-60:]!r}"
                if raw is not None and str(raw).strip()
                else "missing gold answer"
            )
            raise ConfigError(f"{where}: field '{answer_field}': {problem}")
        rows.append(QuestionRow(row, question, gold))
    return rows


def majority(answers: list[str | None]) -> tuple[str | None, int]:
    """The most frequent non-None answer and its count; ties go to the answer seen first (deterministic)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0
    best = max(counts.values())
    for answer in answers:
        if answer is not None and counts[answer] == best:
            return answer, best
    return None, 0  # unreachable: some answer has the best count
