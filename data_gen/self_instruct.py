"""``data-gen self-instruct``: bootstrap an instruction dataset from seed tasks (Wang et al., 2023, "Self-Instruct").

The method, in rounds until ``target`` instructions are kept:

1. *Instruction generation.* Each prompt shows ``num_prompt_instructions`` tasks sampled from the seeds and, once
   there are some, ``num_machine_in_prompt`` machine-generated ones, and asks for more in the same numbered list.
2. *Filtering.* Length bounds, a keyword blacklist (tasks a text model cannot do: images, files, going places),
   leading punctuation, non-ASCII starts, banned prefixes, then ROUGE-L novelty (F <= ``rouge_threshold``) against
   the seeds plus every instruction kept so far (:class:`data_gen.rouge.NoveltyIndex`).
3. *Classification identification.* A few-shot yes/no prompt built from seed tasks.
4. *Instance generation.* Output-first for classification tasks (labels, then an input per label, so the labels
   stay balanced), input-first otherwise; post-processing drops empty, duplicate and degenerate instances.

Log-probabilities (``teacher.logprobs: K``, :mod:`data_gen.logprobs`): a row is one instance of an answer holding
several, so its ``completion_token_ids`` are the slice of the answer's generated ids that spells its output, found
from the ids' character spans; the store holds that slice's rows and the row's provenance names the slice
(``token_span``). The slice ends at the output's last token, with no end-of-turn: the teacher wrote the next
instance there, so its distribution after the output predicts that, and a label it never gave cannot be a target.
Only rows the captured distributions are right for are written, since ``distill train`` refuses a row missing from
the store: output-first (classification) rows are not, their label being written before their input, and nor are
outputs whose edges fall inside a token holding other text. Those instances stay in the journal (nothing paid is
lost) and are counted by reason in ``stats.json`` and the done line.

Resumability: each round's prompts depend only on the seed, the round number and the instructions kept in earlier
rounds, and results are processed in request order, so a rerun replays every earlier round from the answer cache
(free) and reaches the same state. Records are journaled only once their whole round is complete; a round cut short
(budget, Ctrl-C, crash) is redone on the next run from whatever answers were already cached.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_gen import driver
from data_gen.backends import estimate_tokens
from data_gen.config import OutputConfig, TeacherConfig
from data_gen.driver import GenerationResult, Method
from data_gen.engine import CallPlan, Engine, Request, Result
from data_gen.journal import Journal
from data_gen.logprobs import token_spans
from data_gen.output import dataset_card
from data_gen.self_instruct_text import (
    TEMPLATE_HASH,
    FilterConfig,
    classification_prompt,
    filter_reason,
    generation_prompt,
    input_first_instances,
    instance_prompt,
    parse_instances,
    parse_instructions,
    parse_yes_no,
    postprocess_instances,
)
from kd_core.commands import stop_code
from kd_core.config import ConfigError, option, parse_command_line, section, to_dict
from kd_core.records import iter_json_objects
from kd_core.redact import redact_value

PACKAGED_SEEDS = Path(__file__).parent / "assets" / "seed_tasks.jsonl"
CLASSIFY_MAX_TOKENS = 16  # a Yes/No answer: a small cap keeps a rambling teacher cheap and the budget reservation low


@dataclass
class SelfInstructConfig:
    """Settings of ``data-gen self-instruct``."""

    seed_tasks: str = option("", help="seed tasks JSONL in the Self-Instruct format; '' = the packaged 20 seeds")
    target: int = option(100, help="number of instructions to generate")
    num_prompt_instructions: int = option(8, help="example tasks shown in each generation prompt")
    num_machine_in_prompt: int = option(2, help="of which machine-generated (once available)")
    new_per_prompt: int = option(8, help="new tasks asked for in each generation prompt")
    prompts_per_round: int = option(16, help="generation prompts per round (sent concurrently)")
    max_rounds: int = option(1000, help="give up after this many rounds")
    max_instances: int = option(3, help="instances kept per instruction")
    seed: int = option(0, help="seeds the sampling of prompt examples (runs are reproducible)")
    filters: FilterConfig = section(FilterConfig, help="instruction filters")
    teacher: TeacherConfig = section(TeacherConfig, help="teacher backend, limits and prices")
    output: OutputConfig = section(OutputConfig, help="output directory and formats")

    def __post_init__(self) -> None:
        if self.target < 1:
            raise ValueError("target: expected >= 1")
        if not 1 <= self.num_machine_in_prompt < self.num_prompt_instructions:
            raise ValueError("num_machine_in_prompt: expected 1 <= it < num_prompt_instructions")
        for name in ("new_per_prompt", "prompts_per_round", "max_rounds", "max_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1")


# ------------------------------------------------------------------------------------------------ seed tasks
def load_seed_tasks(path: str | Path) -> list[dict[str, Any]]:
    """Seed tasks, validated; a bad line raises ConfigError naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"seed_tasks: file not found: {path}")
    tasks = []
    for number, _, task in iter_json_objects(path):
        where = f"{path}:{number}"
        for field, kind in (("id", str), ("instruction", str), ("instances", list), ("is_classification", bool)):
            if not isinstance(task.get(field), kind):
                raise ConfigError(f"{where}: field '{field}': expected {kind.__name__}, got {task.get(field)!r}")
        if not task["instruction"].strip():
            raise ConfigError(f"{where}: field 'instruction': expected a non-empty string")
        if not task["instances"]:
            raise ConfigError(f"{where}: field 'instances': expected at least one {{input, output}}")
        for k, inst in enumerate(task["instances"]):
            if not (
                isinstance(inst, dict) and isinstance(inst.get("input"), str) and isinstance(inst.get("output"), str)
            ):
                raise ConfigError(f'{where}: field \'instances[{k}]\': expected {{"input": str, "output": str}}')
        tasks.append(task)
    if len(tasks) < 2:
        raise ConfigError(f"seed_tasks: {path} has {len(tasks)} tasks; expected at least 2")
    return tasks


# ------------------------------------------------------------------------------------------------ pipeline
class SelfInstruct:
    """The round loop; ``state`` is the journal plus the replayed rounds (see the module docstring)."""

    def __init__(
        self,
        cfg: SelfInstructConfig,
        engine: Engine,
        seeds: list[dict[str, Any]],
        journal: Journal,
        tokenizer: Any = None,
    ) -> None:
        from data_gen.rouge import NoveltyIndex

        self.cfg = cfg
        self.tokenizer = tokenizer  # with teacher.logprobs: the teacher's, to find each output's tokens
        self.engine = engine
        self.seeds = seeds
        self.journal = journal
        self.novelty = NoveltyIndex(threshold=cfg.filters.rouge_threshold)
        for task in seeds:
            self.novelty.add(task["instruction"])
        self.machine: list[str] = []  # kept machine instructions, in order
        self.kept_ids: list[str] = []

    def _provenance(self, round_no: int, results: list[Any]) -> dict[str, Any]:
        t = self.cfg.teacher
        return {
            "teacher": t.model,
            "backend": t.backend,
            "base_url": redact_value(t.base_url),
            "decoding": results[-1].params,
            "prompt_template_sha256": TEMPLATE_HASH,
            "seed": self.cfg.seed,
            "round": round_no,
            "cached": all(r.cached for r in results),
            "cost_usd": sum(r.cost_usd for r in results),
            "started": min(r.started for r in results),
            "finished": max(r.finished for r in results),
            "recorded": time.time(),
        }

    def _round_requests(self, round_no: int) -> list[Request]:
        rng = random.Random(f"{self.cfg.seed}:{round_no}")
        requests = []
        for p in range(self.cfg.prompts_per_round):
            n_machine = min(self.cfg.num_machine_in_prompt, len(self.machine))
            examples = rng.sample(self.machine, n_machine)
            n_seed = min(self.cfg.num_prompt_instructions - n_machine, len(self.seeds))
            examples += [t["instruction"] for t in rng.sample(self.seeds, n_seed)]
            rng.shuffle(examples)
            requests.append(
                Request(
                    f"r{round_no:05d}-p{p:03d}",
                    generation_prompt(examples, self.cfg.new_per_prompt),
                    meta={"round": round_no},
                )
            )
        return requests

    async def run_round(self, round_no: int) -> bool:
        """One round; returns False when the engine stopped before the round was complete (nothing journaled)."""
        generated = await self.engine.map(self._round_requests(round_no), parse_instructions)
        if any(r is None for r in generated):
            return False
        candidates = self._filter_candidates(generated)
        rng = random.Random(f"{self.cfg.seed}:{round_no}:shots")
        cls_shots = rng.sample(self.seeds, min(len(self.seeds), 6))
        labels = await self.engine.map(
            [
                Request(
                    f"{cid}-cls", classification_prompt(text, cls_shots), decoding={"max_tokens": CLASSIFY_MAX_TOKENS}
                )
                for cid, text, _ in candidates
            ],
            parse_yes_no,
        )
        if any(r is None for r in labels):
            return False
        instances = await self.engine.map(self._instance_requests(candidates, labels))
        if any(r is None for r in instances):
            return False
        self._journal_round(round_no, candidates, labels, instances)
        return True

    def _filter_candidates(self, generated: list[Result]) -> list[tuple[str, str, Result]]:
        """The round's proposals that pass the filters and ROUGE-L novelty, as (record id, instruction, generation
        result); each is added to the novelty pool and the machine pool at once, rejections are counted."""
        candidates: list[tuple[str, str, Result]] = []
        for result in generated:
            if not result.ok:
                continue
            for k, instruction in enumerate(result.parsed):
                reason = filter_reason(instruction, self.cfg.filters)
                if reason is None:
                    # is_novel stops at the first pooled text above the threshold (3-4x faster than add_if_novel,
                    # which finds the exact argmax we would discard).
                    kept = self.novelty.is_novel(instruction)
                    if kept:
                        self.novelty.add(instruction)
                    reason = None if kept else "rouge_similar"
                if reason is not None:
                    self.engine.reject(reason)
                    continue
                candidates.append((f"si-{result.request.id}-{k:02d}", instruction, result))
                self.machine.append(instruction)
        return candidates

    def _instance_requests(self, candidates: list[tuple[str, str, Result]], labels: list[Result]) -> list[Request]:
        """One instance-generation request per candidate, output-first for classification tasks, with two seed shots
        of the same kind."""
        requests = []
        for (cid, text, _), label in zip(candidates, labels):
            is_cls = bool(label.ok and label.parsed)
            pool = [t for t in self.seeds if t["is_classification"] == is_cls] or self.seeds
            shots = random.Random(f"{self.cfg.seed}:{cid}").sample(pool, min(2, len(pool)))
            # A partial (not a lambda) so results stay picklable for gather_object across processes.
            requests.append(
                Request(
                    f"{cid}-inst",
                    instance_prompt(text, is_cls, shots, self.cfg.max_instances),
                    meta={"is_classification": is_cls},
                    parse=functools.partial(parse_instances, is_classification=is_cls),
                )
            )
        return requests

    def _journal_round(
        self,
        round_no: int,
        candidates: list[tuple[str, str, Result]],
        labels: list[Result],
        instances: list[Result],
    ) -> None:
        """Keeps the candidates with valid instances, in request order, up to ``target``; rank 0 journals them."""
        for (cid, text, gen), label, inst in zip(candidates, labels, instances):
            is_cls = inst.request.meta["is_classification"]
            if not inst.ok:
                continue  # the engine counted it as a parse rejection
            pairs = postprocess_instances(text, inst.parsed, self.cfg.max_instances)
            if not pairs:
                self.engine.reject("no_valid_instances")
                continue
            record = {
                "id": cid,
                "instruction": text,
                "is_classification": is_cls,
                "instances": pairs,
                "provenance": self._provenance(round_no, [gen, label, inst]),
            }
            if inst.token_ids is not None:
                record["instances"] = capture_instances(self.tokenizer, inst, pairs, is_cls)
                record["provenance"]["logprobs_key"] = inst.logprobs_key
            if len(self.kept_ids) >= self.cfg.target:
                break
            self.kept_ids.append(cid)
            if self.engine.rank == 0 and self.journal.append(record):
                self.engine.advance()

    async def run(self) -> None:
        for round_no in range(self.cfg.max_rounds):
            if len(self.kept_ids) >= self.cfg.target or self.engine.stopped:
                return
            if not await self.run_round(round_no):
                return
        if len(self.kept_ids) < self.cfg.target:  # the last round may be the one that reached it
            self.engine.stop("max_rounds")
            print(f"gave up after max_rounds={self.cfg.max_rounds} rounds with {len(self.kept_ids)} instructions")


def capture_instances(
    tokenizer: Any, answer: Result, pairs: list[dict[str, str]], is_classification: bool
) -> list[dict[str, Any]]:
    """``pairs`` (kept instances of ``answer``, which has captured log-probabilities), each with the span of the
    answer's generated tokens that spell its output (``token_span``) and those ids (``token_ids``), or the reason it
    has none (``uncaptured``): ``output_first`` (a classification label is written before its input, so its
    distribution is not conditioned on the input the row gives the student) or ``not_delimited`` (the output does not
    begin and end on token boundaries)."""
    if is_classification:
        return [{**pair, "uncaptured": "output_first"} for pair in pairs]
    found = input_first_instances(answer.text)
    # Kept pairs are parsed pairs in order, minus some: each is the first unused parsed one with its input and output.
    where, used = [], set()
    for pair in pairs:
        k = next(k for k, (i, o, _) in enumerate(found) if k not in used and (i, o) == (pair["input"], pair["output"]))
        used.add(k)
        where.append(found[k][2])
    ids = answer.token_ids
    captured = []
    for pair, span in zip(pairs, token_spans(tokenizer, answer.text, ids, where)):
        if span is None:
            captured.append({**pair, "uncaptured": "not_delimited"})
        else:
            captured.append({**pair, "token_span": list(span), "token_ids": ids[span[0] : span[1]]})
    return captured


def to_rows(records: list[dict[str, Any]], captured_only: bool = False) -> list[dict[str, Any]]:
    """One row per instance, with chat ``messages`` and instruction/input/output columns. With ``captured_only``
    (teacher.logprobs), only instances with captured tokens, each with its ``completion_token_ids`` and, in its
    provenance, the ``token_span`` of its answer's log-probabilities; the others stay in the journal only (see the
    module docstring)."""
    rows = []
    for record in records:
        for j, inst in enumerate(record["instances"]):
            if captured_only and "token_span" not in inst:
                continue
            prompt = record["instruction"] + (f"\n\n{inst['input']}" if inst["input"] else "")
            row = {
                "id": f"{record['id']}-{j}",
                "instruction": record["instruction"],
                "input": inst["input"],
                "output": inst["output"],
                "is_classification": record["is_classification"],
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": inst["output"]}],
                "provenance": record["provenance"],
            }
            if captured_only:
                row["completion_token_ids"] = inst["token_ids"]
                row["provenance"] = {**record["provenance"], "token_span": inst["token_span"]}
            rows.append(row)
    return rows


def kept_out(records: list[dict[str, Any]]) -> dict[str, int]:
    """Instances without captured tokens, by reason (see :func:`capture_instances`)."""
    reasons = Counter(inst["uncaptured"] for record in records for inst in record["instances"] if "uncaptured" in inst)
    return dict(sorted(reasons.items()))


def estimate_plan(cfg: SelfInstructConfig, seeds: list[dict[str, Any]], remaining: int) -> list[CallPlan]:
    """Calls needed for ``remaining`` instructions, assuming half the proposals survive the filters."""
    example_prompt = generation_prompt(
        [t["instruction"] for t in seeds[: cfg.num_prompt_instructions]], cfg.new_per_prompt
    )
    inst_prompt = instance_prompt(seeds[0]["instruction"], False, seeds[:2], cfg.max_instances)
    rounds = math.ceil(remaining / max(1, cfg.prompts_per_round * cfg.new_per_prompt * 0.5))
    return [
        CallPlan("instruction generation", rounds * cfg.prompts_per_round, estimate_tokens(example_prompt)),
        CallPlan(
            "classification", remaining, estimate_tokens(classification_prompt("x", seeds[:6])), CLASSIFY_MAX_TOKENS
        ),
        CallPlan("instances", remaining, estimate_tokens(inst_prompt)),
    ]


class SelfInstructMethod(Method):
    """``data-gen self-instruct`` for :mod:`data_gen.driver`: one journal record per kept instruction."""

    name = "self-instruct"
    unit = "instr"
    legacy_keys = ("seed_tasks", "target")

    def __init__(self, cfg: SelfInstructConfig) -> None:
        self.cfg = cfg
        self.seeds = load_seed_tasks(cfg.seed_tasks or PACKAGED_SEEDS)

    def resume_keys(self) -> dict[str, Any]:
        """Resume only a run of the same teacher and seed, capturing the same log-probabilities (named only when
        set: the ownership marker of a run begun before capture existed records no such key, and resumes)."""
        cfg = self.cfg
        keys = {"seed": cfg.seed, "teacher.model": cfg.teacher.model}
        return keys if cfg.teacher.logprobs is None else {**keys, "teacher.logprobs": cfg.teacher.logprobs}

    def total(self) -> int:
        return self.cfg.target

    def plan(self, remaining: int) -> list[CallPlan]:
        return estimate_plan(self.cfg, self.seeds, remaining)

    async def generate(self, engine: Engine, journal: Journal) -> None:
        await SelfInstruct(self.cfg, engine, self.seeds, journal, self.teacher_tokenizer).run()

    def records(self, journal: Journal) -> list[dict[str, Any]]:
        # Journal order is the order instructions were kept (replayed rounds append nothing), so the data files
        # hold every journaled record even when this run stopped while replaying.
        return list(journal.records.values())[: self.cfg.target]

    def rows(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return to_rows(records, captured_only=self.cfg.teacher.logprobs is not None)

    def stats(self, records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """With teacher.logprobs: the instances kept out of the data files, by reason; otherwise none."""
        if self.cfg.teacher.logprobs is None:
            return None
        return {"instructions": len(records), "rows": len(rows), "kept_out": kept_out(records)}

    def card(self, records: list[dict[str, Any]], rows: list[dict[str, Any]], summary: str) -> str:
        return dataset_card(
            "Self-Instruct data",
            "Instructions bootstrapped from seed tasks with the "
            "Self-Instruct method (generate, filter, ROUGE-L novelty, classify, instances).",
            len(records),
            self.cfg.output.formats,
            to_dict(self.cfg.teacher),
            summary,
        )

    def done_line(self, records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
        line = f"{len(records)} instructions ({len(rows)} rows)"
        out = kept_out(records) if self.cfg.teacher.logprobs is not None else {}
        if out:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in out.items())
            line += f"; {sum(out.values())} instances without captured log-probabilities kept out ({reasons})"
        return line


Config = SelfInstructConfig


def run(cfg: SelfInstructConfig) -> GenerationResult:
    """``cfg.target`` instructions with their instances in ``cfg.output.dir``; ``stopped`` is set when the engine
    stopped early (budget, signal, ``max_rounds``)."""
    return driver.run(SelfInstructMethod(cfg))


def main(argv: list[str]) -> int:
    cfg = parse_command_line(SelfInstructConfig, argv, "data-gen self-instruct", __doc__.split("\n\n")[0])
    return stop_code(run(cfg).stopped)
