"""``data-gen cot``: chain-of-thought rationales from a teacher, checked against gold answers (or a majority vote).

For each question the teacher writes ``k`` rationales from a few-shot prompt. An answer extractor
(:mod:`kd_core.answers`) reads each one's final answer, normalised, and compares it with the gold label:

* ``mode: gold`` (needs a gold answer for every question): a rationale is kept when its answer matches. A question
  none of whose ``k`` samples is right is *rationalized* as in STaR (Zelikman et al., 2022): the teacher is asked
  again with the gold answer given as a hint, up to ``rationalization_attempts`` times. The hint is only in the
  teacher's prompt: the saved record's prompt is the plain question, and a rationale that mentions the hint is
  rejected.
* ``mode: vote`` (self-consistency, Wang et al., 2023; no gold needed): the majority answer over the ``k`` samples is
  the label, kept when it has at least ``min_vote_share`` of the votes; rationales that agree with it are kept.

Every rejected rationale is counted by reason (``no_answer``, ``wrong_answer``, ``truncated``, ``mentions_hint``,
``minority``), and every question without a kept rationale too (``unsolved``, ``no_majority``).

Resumability: one journal record per finished question (kept rationales and its rejection counts). Questions are
processed in chunks; a rerun skips journaled questions and replays cached answers for the rest, so nothing is paid
for twice and nothing is duplicated.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from data_gen import driver
from data_gen.backends import estimate_tokens
from data_gen.config import OutputConfig, TeacherConfig
from data_gen.cot_prompts import PromptConfig, teacher_messages, template_hash
from data_gen.driver import GenerationResult, Method
from data_gen.engine import CallPlan, Engine, Request, Result
from data_gen.journal import Journal
from data_gen.logprobs import captured, completion_ids, logprobs_key
from data_gen.output import dataset_card
from kd_core import answers
from kd_core.answers import AnswerExtractor, majority
from kd_core.commands import stop_code
from kd_core.config import option, parse_command_line, section, to_dict
from kd_core.redact import redact_value


@dataclass
class CotConfig:
    """Settings of ``data-gen cot``."""

    input_file: str = option("", help="questions: .jsonl/.json/.parquet (GSM8K's {question, answer} works as is)")
    question_field: str = option("question", help="column holding the question")
    answer_field: str | None = option(
        "answer", help="column holding the gold answer (text after '####' if any); null = none"
    )
    max_questions: int | None = option(None, help="use the first N questions")
    mode: Literal["gold", "vote"] = option("gold", help="gold: check against gold answers; vote: self-consistency")
    k: int = option(4, help="rationales sampled per question")
    keep_per_question: int = option(1, help="correct rationales kept per question (distinct texts)")
    rationalization_attempts: int = option(1, help="mode=gold: hinted retries for a question with no correct sample")
    min_vote_share: float = option(0.5, help="mode=vote: the majority needs at least this share of the k samples")
    chunk_size: int = option(64, help="questions per chunk (a chunk is journaled when complete)")
    seed: int = option(0, help="per-sample seeds are seed + sample index (sent to the server)")
    extractor: AnswerExtractor = section(
        AnswerExtractor,
        help="final-answer extraction (the same section as the "
        "trainer's accuracy.extractor and distill eval's extractor)",
    )
    prompt: PromptConfig = section(PromptConfig, help="teacher prompt")
    teacher: TeacherConfig = section(TeacherConfig, help="teacher backend, limits and prices")
    output: OutputConfig = section(OutputConfig, help="output directory and formats")

    def __post_init__(self) -> None:
        if not self.input_file:
            raise ValueError("input_file: expected a questions file")
        for name in ("k", "keep_per_question", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1")
        if self.rationalization_attempts < 0:
            raise ValueError("rationalization_attempts: expected >= 0")
        if not 0 < self.min_vote_share <= 1:
            raise ValueError("min_vote_share: expected a value in (0, 1]")
        if self.max_questions is not None and self.max_questions < 1:
            raise ValueError("max_questions: expected >= 1 or null")
        if self.mode == "gold" and not self.answer_field:
            raise ValueError("answer_field: mode 'gold' needs gold answers; set it, or use mode: vote")


# ------------------------------------------------------------------------------------------------ input
def load_questions(cfg: CotConfig) -> list[dict[str, Any]]:
    """``[{id, row, question, gold}]`` (:func:`kd_core.answers.load_questions`); in gold mode a question without a
    usable gold answer is a ConfigError naming it."""
    rows = answers.load_questions(
        cfg.input_file,
        "input_file",
        cfg.question_field,
        cfg.answer_field,
        numeric=cfg.extractor.numeric,
        require_gold=cfg.mode == "gold",
        limit=cfg.max_questions,
    )
    return [
        {
            "id": "q" + hashlib.sha256(r.question.encode()).hexdigest()[:12] + f"-{r.row}",
            "row": r.row,
            "question": r.question,
            "gold": r.gold,
        }
        for r in rows
    ]


# ------------------------------------------------------------------------------------------------ pipeline
class ChainOfThought:
    """Samples, checks, rationalizes and journals questions chunk by chunk."""

    def __init__(self, cfg: CotConfig, engine: Engine, journal: Journal) -> None:
        self.cfg = cfg
        self.engine = engine
        self.journal = journal
        self.extractor = cfg.extractor

    def _request(self, q: dict[str, Any], sample: int, hint: str | None = None) -> Request:
        kind = "h" if hint is not None else "s"
        # A per-sample seed makes the k calls differ (and reproducible) on servers and the local backend alike.
        return Request(
            f"{q['id']}-{kind}{sample}",
            teacher_messages(self.cfg.prompt, q["question"], hint),
            sample=sample,
            decoding={"seed": self.cfg.seed + sample},
            meta={"qid": q["id"]},
        )

    def judge(self, result: Result, target: str | None, hinted: bool) -> tuple[str | None, str | None]:
        """(extracted answer, rejection reason or None)."""
        if not result.ok or result.text is None:
            return None, result.error or "no_text"
        if result.finish_reason == "length":
            return None, "truncated"
        answer = self.extractor.extract(result.text)
        if answer is None:
            return None, "no_answer"
        if hinted and any(w.lower() in result.text.lower() for w in self.cfg.prompt.hint_words):
            return answer, "mentions_hint"
        if target is not None and answer != target:
            return answer, "wrong_answer" if self.cfg.mode == "gold" else "minority"
        return answer, None

    def _keep(self, kept: list[dict[str, Any]], result: Result, answer: str, attempts: int, hinted: bool) -> bool:
        text = result.text.strip()
        if len(kept) >= self.cfg.keep_per_question or any(k["rationale"] == text for k in kept):
            return False
        kept.append(
            {
                "rationale": text,
                "answer": answer,
                "attempts": attempts,
                "rationalized": hinted,
                "sample": result.request.sample,
                "cached": result.cached,
                "cost_usd": result.cost_usd,
                **captured(result),
            }
        )
        return True

    async def run_chunk(self, chunk: list[dict[str, Any]]) -> bool:
        """Samples, judges and journals ``chunk``; False when the engine stopped first (nothing journaled)."""
        k = self.cfg.k
        results = await self.engine.map([self._request(q, j) for q in chunk for j in range(k)])
        if any(r is None for r in results):
            return False
        state = {q["id"]: self._judge_samples(q, results[i * k : (i + 1) * k]) for i, q in enumerate(chunk)}
        if self.cfg.mode == "gold" and not await self._rationalize(chunk, state):
            return False
        self._journal_chunk(chunk, state)
        return True

    def _judge_samples(self, q: dict[str, Any], samples: list[Result]) -> dict[str, Any]:
        """One question's state after its ``k`` plain samples: kept rationales, rejections, the label and its votes."""
        rejections: Counter[str] = Counter()
        kept: list[dict[str, Any]] = []
        target = q["gold"]
        label = q["gold"]
        votes = 0
        if self.cfg.mode == "vote":
            answers = [self.judge(r, None, False)[0] for r in samples]
            label, votes = majority(answers)
            if label is None or votes < self.cfg.min_vote_share * self.cfg.k:
                rejections["no_majority"] += 1
                label = None
            target = label
        for n, result in enumerate(samples, start=1):
            if label is None and self.cfg.mode == "vote":
                break
            answer, reason = self.judge(result, target, False)
            if reason is not None:
                rejections[reason] += 1
            elif not self._keep(kept, result, answer, n, False):
                rejections["surplus"] += 1
        return {"kept": kept, "rejections": rejections, "label": label, "votes": votes, "calls": self.cfg.k}

    async def _rationalize(self, chunk: list[dict[str, Any]], state: dict[str, dict[str, Any]]) -> bool:
        """STaR: hinted retries for the questions with no correct sample yet; False when the engine stopped first."""
        for attempt in range(self.cfg.rationalization_attempts):
            todo = [q for q in chunk if not state[q["id"]]["kept"]]
            if not todo:
                break
            hinted = await self.engine.map([self._request(q, self.cfg.k + attempt, q["gold"]) for q in todo])
            if any(r is None for r in hinted):
                return False
            for q, result in zip(todo, hinted):
                s = state[q["id"]]
                s["calls"] += 1
                answer, reason = self.judge(result, q["gold"], True)
                if reason is not None:
                    s["rejections"][f"rationalized_{reason}"] += 1
                else:
                    self._keep(s["kept"], result, answer, s["calls"], True)
        return True

    def _journal_chunk(self, chunk: list[dict[str, Any]], state: dict[str, dict[str, Any]]) -> None:
        """Counts each question's rejections with the engine and journals one record per question (rank 0 writes)."""
        for q in chunk:
            s = state[q["id"]]
            if not s["kept"] and self.cfg.mode == "gold":
                s["rejections"]["unsolved"] += 1
            for reason, n in s["rejections"].items():
                self.engine.reject(reason, n)
            record = {
                "id": q["id"],
                "row": q["row"],
                "question": q["question"],
                "gold": q["gold"],
                "label": s["label"],
                "votes": s["votes"],
                "calls": s["calls"],
                "kept": s["kept"],
                "rejections": dict(s["rejections"]),
                "recorded": time.time(),
            }
            if self.engine.rank == 0 and self.journal.append(record):
                self.engine.advance()

    async def run(self, questions: list[dict[str, Any]]) -> None:
        todo = [q for q in questions if q["id"] not in self.journal]
        for start in range(0, len(todo), self.cfg.chunk_size):
            if self.engine.stopped or not await self.run_chunk(todo[start : start + self.cfg.chunk_size]):
                return


def to_rows(cfg: CotConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kept rationale, with the trainer's shapes (``messages``, ``prompt``/``completion``) and the
    step-by-step columns (``rationale``, ``label``). The prompt is the plain question: never the hint, never shots."""
    rows = []
    t = cfg.teacher
    for record in records:
        for j, kept in enumerate(record["kept"]):
            matched = kept["answer"] == record["gold"] if record["gold"] is not None else None
            rows.append(
                {
                    "id": f"{record['id']}-{j}",
                    "question": record["question"],
                    "rationale": kept["rationale"],
                    "answer": kept["answer"],
                    "gold": record["gold"],
                    "label": record["label"] or kept["answer"],
                    "correct": matched,
                    "attempts": kept["attempts"],
                    "rationalized": kept["rationalized"],
                    "prompt": record["question"],
                    "completion": kept["rationale"],
                    "messages": [
                        {"role": "user", "content": record["question"]},
                        {"role": "assistant", "content": kept["rationale"]},
                    ],
                    **completion_ids(kept),
                    "provenance": {
                        "teacher": t.model,
                        "backend": t.backend,
                        "base_url": redact_value(t.base_url),
                        "prompt_template_sha256": template_hash(cfg.prompt),
                        "seed": cfg.seed,
                        "sample": kept["sample"],
                        "cached": kept["cached"],
                        "cost_usd": kept["cost_usd"],
                        "mode": cfg.mode,
                        "votes": record["votes"],
                        "recorded": record["recorded"],
                        **logprobs_key(kept),
                    },
                }
            )
    return rows


def rejection_totals(records: list[dict[str, Any]]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for record in records:
        totals.update(record["rejections"])
    return dict(sorted(totals.items()))


class CotMethod(Method):
    """``data-gen cot`` for :mod:`data_gen.driver`: one journal record per question."""

    name = "cot"
    unit = "q"
    journal_required = False  # a deleted journal is rebuilt from the answer cache at no cost
    legacy_keys = ("input_file", "question_field")

    def __init__(self, cfg: CotConfig) -> None:
        self.cfg = cfg
        self.questions = load_questions(cfg)
        self.order = {q["id"]: i for i, q in enumerate(self.questions)}

    def resume_keys(self) -> dict[str, Any]:
        """Resume only a cot run with the same input, mode, seed and teacher, capturing the same log-probabilities
        (records journaled without them would be missing from the store; absent = null, as earlier runs recorded)."""
        cfg = self.cfg
        return {
            "input_file": cfg.input_file,
            "mode": cfg.mode,
            "seed": cfg.seed,
            "k": cfg.k,
            "teacher.model": cfg.teacher.model,
            "teacher.logprobs": cfg.teacher.logprobs,
        }

    def total(self) -> int:
        return len(self.questions)

    def plan(self, remaining: int) -> list[CallPlan]:
        cfg = self.cfg
        prompt_tokens = estimate_tokens(teacher_messages(cfg.prompt, self.questions[0]["question"]))
        extra = cfg.rationalization_attempts if cfg.mode == "gold" else 0
        return [
            CallPlan("rationales", remaining * cfg.k, prompt_tokens),
            CallPlan("rationalization (worst case)", remaining * extra, prompt_tokens + 40),
        ]

    async def generate(self, engine: Engine, journal: Journal) -> None:
        await ChainOfThought(self.cfg, engine, journal).run(self.questions)

    def records(self, journal: Journal) -> list[dict[str, Any]]:
        order = self.order
        return sorted((r for r in journal.records.values() if r["id"] in order), key=lambda r: order[r["id"]])

    def rows(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return to_rows(self.cfg, records)

    def summary(self, engine_summary: str, records: list[dict[str, Any]]) -> str:
        return engine_summary + f"\nrejections over all runs: {rejection_totals(records) or 0}"

    def card(self, records: list[dict[str, Any]], rows: list[dict[str, Any]], summary: str) -> str:
        cfg = self.cfg
        return dataset_card(
            "Chain-of-thought rationales",
            f"Teacher rationales checked by mode '{cfg.mode}' "
            "(answer extractor '" + cfg.extractor.kind + "'); STaR rationalization for "
            "questions without a correct sample. Prompts are the plain questions.",
            len(rows),
            cfg.output.formats,
            to_dict(cfg.teacher),
            summary,
        )

    def stats(self, records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "questions": len(self.questions),
            "done": len(records),
            "solved": sum(1 for r in records if r["kept"]),
            "rows": len(rows),
            "rationalized": sum(1 for row in rows if row["rationalized"]),
            "rejections": rejection_totals(records),
        }

    def done_line(self, records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
        solved = sum(1 for r in records if r["kept"])
        return f"{len(rows)} rationales for {solved}/{len(records)} questions"


Config = CotConfig


def run(cfg: CotConfig) -> GenerationResult:
    """Rationales for ``cfg.input_file`` in ``cfg.output.dir`` (``stats.json`` counts them); ``stopped`` is set when
    the engine stopped early."""
    return driver.run(CotMethod(cfg))


def main(argv: list[str]) -> int:
    cfg = parse_command_line(CotConfig, argv, "data-gen cot", __doc__.split("\n\n")[0])
    return stop_code(run(cfg).stopped)


__all__ = [
    "ChainOfThought",
    "Config",
    "CotConfig",
    "PromptConfig",
    "load_questions",
    "main",
    "run",
    "teacher_messages",
    "to_rows",
]
