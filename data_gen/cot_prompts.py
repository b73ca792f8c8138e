"""The prompt side of ``data-gen cot`` (:mod:`data_gen.cot`): the few-shot prompt the teacher sees, with and without
the STaR hint, and its hash for the records' provenance.

Pure functions of text and config: the pipeline in :mod:`data_gen.cot` calls them; the prompt is never saved with the
records (they hold the plain question).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from kd_core.config import option, to_dict

DEFAULT_SHOTS = [
    {
        "question": "A baker makes 4 trays of 12 rolls and sells 30 rolls. How many rolls are left?",
        "rationale": "The baker makes 4 * 12 = 48 rolls. After selling 30, 48 - 30 = 18 rolls are left. "
        "So the answer is 18.",
    },
    {
        "question": "Mia reads 15 pages a day. How many days does she need for a 120-page book?",
        "rationale": "Each day covers 15 pages, so she needs 120 / 15 = 8 days. So the answer is 8.",
    },
    {
        "question": "A ticket costs $7 and Leo buys 3 tickets with a $50 note. How much change does he get?",
        "rationale": "Three tickets cost 3 * 7 = 21 dollars. The change is 50 - 21 = 29 dollars. So the answer is 29.",
    },
]


@dataclass
class PromptConfig:
    """The few-shot prompt the teacher sees (never saved with the records)."""

    instruction: str = option(
        "Solve the problem. Reason step by step, then end with 'So the answer is <answer>.'",
        help="first line of the teacher prompt",
    )
    shots: list[dict[str, str]] = option(DEFAULT_SHOTS, help="worked examples: [{question, rationale}]")
    template: str = option("Question: {question}\nAnswer:", help="how each question is shown; needs {question}")
    hint_template: str = option(
        "Question: {question}\n(The correct answer is {hint}. Write the reasoning that leads to it as if solving the "
        "problem yourself, without mentioning that the answer was given.)\nAnswer:",
        help="STaR rationalization prompt; needs {question} and {hint}",
    )
    hint_words: list[str] = option(
        ["hint", "answer was given", "were told", "was told"],
        help="a rationalized rationale containing one of these is rejected",
    )

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ValueError("template: expected a {question} placeholder")
        if "{question}" not in self.hint_template or "{hint}" not in self.hint_template:
            raise ValueError("hint_template: expected {question} and {hint} placeholders")
        for i, shot in enumerate(self.shots):
            if set(shot) != {"question", "rationale"}:
                raise ValueError(f"shots[{i}]: expected keys question and rationale, got {sorted(shot)}")


def teacher_messages(cfg: PromptConfig, question: str, hint: str | None = None) -> list[dict[str, str]]:
    """The teacher's chat: instruction, worked shots, then the question (with the STaR hint when ``hint`` is given)."""
    shots = "".join(cfg.template.format(question=s["question"]) + " " + s["rationale"] + "\n\n" for s in cfg.shots)
    asked = (
        cfg.template.format(question=question)
        if hint is None
        else cfg.hint_template.format(question=question, hint=hint)
    )
    return [{"role": "user", "content": f"{cfg.instruction}\n\n{shots}{asked}"}]


def template_hash(cfg: PromptConfig) -> str:
    """A short hash of the whole prompt config, saved in each row's provenance."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
