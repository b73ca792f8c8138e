"""The referee of ``data-gen lion``'s discrimination stage: its prompt, the parsing of its scores, and the arithmetic
that turns the two position-swapped scores of each instruction into a verdict (hard or easy) and the stage's totals
(win rate, mean scores). Pure functions: the engines that ask the referee stay in :mod:`kd_recipes.lion`.
"""

from __future__ import annotations

import re
from typing import Any

from data_gen.calls import Result
from data_gen.engine import ParseError

REFEREE_TEMPLATE = (
    "You are a fair judge. Rate how helpful, correct and complete each of the two answers to the instruction is, "
    "on a scale from 1 to 10. Reply with exactly two lines: 'Assistant 1: <score>' and 'Assistant 2: <score>'.\n\n"
    "Instruction: {instruction}\n\n[Assistant 1]\n{first}\n\n[Assistant 2]\n{second}\n"
)
_SCORE = re.compile(r"assistant\s*([12])\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_scores(text: str, finish_reason: str) -> tuple[float, float]:
    """(score of assistant 1, score of assistant 2), each in 1..10; anything else is a ParseError (retried)."""
    found = {int(k): float(v) for k, v in _SCORE.findall(text)}
    if set(found) != {1, 2}:
        raise ParseError("referee_unparsed")
    if not all(1 <= found[k] <= 10 for k in (1, 2)):
        raise ParseError("referee_out_of_range")
    return found[1], found[2]


def verdicts(pool: list[str], scored: list[Result], hard_threshold: float) -> list[dict[str, Any]]:
    """One item per instruction from its two referee results (teacher first, then student first): the averaged
    scores and whether it is hard, or why it was skipped when either result failed."""
    items = []
    for i, inst in enumerate(pool):
        first, second = scored[2 * i], scored[2 * i + 1]
        if not (first.ok and second.ok):
            items.append({"instruction": inst, "skipped": first.error or second.error})
            continue
        teacher_score = (first.parsed[0] + second.parsed[1]) / 2  # positions swapped, then averaged
        student_score = (first.parsed[1] + second.parsed[0]) / 2
        items.append(
            {
                "instruction": inst,
                "teacher_score": teacher_score,
                "student_score": student_score,
                "hard": teacher_score - student_score >= hard_threshold,
            }
        )
    return items


def discrimination_result(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The discrimination stage's ``done.json``: the items, their counts, the student's win rate (a tie counts a
    half) and the mean scores over the items that were scored."""
    scored = [it for it in items if "skipped" not in it]
    wins = sum(
        1.0 if it["student_score"] > it["teacher_score"] else 0.5 if it["student_score"] == it["teacher_score"] else 0.0
        for it in scored
    )
    return {
        "items": items,
        "scored": len(scored),
        "skipped": len(items) - len(scored),
        "hard": sum(it["hard"] for it in scored),
        "easy": sum(not it["hard"] for it in scored),
        "win_rate": wins / len(scored) if scored else None,
        "mean_teacher": sum(it["teacher_score"] for it in scored) / max(1, len(scored)),
        "mean_student": sum(it["student_score"] for it in scored) / max(1, len(scored)),
    }
