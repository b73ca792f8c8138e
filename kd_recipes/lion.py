"""``data-gen lion``: the adversarial distillation loop of Lion (Jiang et al., 2023, "Lion: Adversarial Distillation
of Proprietary Large Language Models"), one numbered iteration at a time.

Each iteration ``iter_NNN/`` has three stages, each finished by an atomically written ``done.json``:

1. *imitation*: the teacher answers the train pool; the student is trained on the answers with the project's
   trainer (:func:`distill.training.train.run`): logit KD plus cross-entropy when the teacher is a local model,
   sequence-level (cross-entropy on the teacher's text) when it is an API. Training starts from the previous
   iteration's student.
2. *discrimination*: teacher and student (the local student, batched through the engine's local backend) answer the
   cache pool; a referee scores both answers 1-10 twice, with the positions swapped, and the two scores of each side
   are averaged (against position bias). An instruction is *hard* when teacher minus student >= ``hard_threshold``.
3. *generation*: the teacher writes new hard instructions from hard seeds (same domain and task type, harder) and,
   fewer, new easy ones from easy seeds; those that pass the ROUGE-L novelty filter against the whole pool join the
   train and cache pools.

Resumability: a stage with ``done.json`` is skipped; an unfinished one is redone, with every teacher, student and
referee answer replayed from the SQLite answer cache and the trainer resuming from its newest checkpoint, so a
``kill -9`` anywhere costs at most the call or step in flight. The headline figure, the student's win rate against
the teacher per iteration, is written to ``lion_summary.json`` and printed as a table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_gen.config import DecodingConfig, TeacherConfig
from data_gen.engine import Engine, EngineError, Request, build_engine
from data_gen.self_instruct import parse_instructions
from kd_core import ownership
from kd_core.atomic import atomic_write_json, atomic_write_text
from kd_core.commands import Stopped, stop_code
from kd_core.config import ConfigError, option, parse_command_line, save_config, section
from kd_core.records import iter_json_objects
from kd_recipes.lion_referee import REFEREE_TEMPLATE, discrimination_result, parse_scores, verdicts

HARD_TEMPLATE = (
    "Here are instructions from one domain:\n{examples}\nWrite {n} new instructions of the same domain and task type "
    "as these, but harder: they need more steps, knowledge or care. List them as 'Task N: <instruction>'."
)
EASY_TEMPLATE = (
    "Here are instructions from one domain:\n{examples}\nWrite {n} new instructions of the same domain, of any task "
    "type, varied and different from these. List them as 'Task N: <instruction>'."
)


@dataclass
class StudentTraining:
    """How the student is trained in each imitation stage (the ``distill train`` config: :meth:`Lion.train_student`)."""

    max_steps: int = option(20, help="optimizer steps per iteration")
    learning_rate: float = option(1e-4, help="peak learning rate")
    batch_size: int = option(4, help="sequences per micro-batch")
    max_length: int = option(512, help="tokens per sequence")
    kd_weight: float = option(0.5, help="local teacher only: weight of forward KL (the rest is cross-entropy)")


@dataclass
class LionConfig:
    """Settings of ``data-gen lion``."""

    train_pool: str = option("", help="initial instructions (JSONL with an 'instruction' field)")
    cache_pool: str | None = option(None, help="instructions for discrimination; null = the train pool")
    student: str = option("", help="initial student model directory (with a tokenizer that has a chat template)")
    iterations: int = option(2, help="number of Lion iterations")
    hard_threshold: float = option(1.0, help="hard when teacher score - student score >= this")
    new_hard: int = option(4, help="new hard instructions asked for per iteration")
    new_easy: int = option(2, help="new easy instructions asked for per iteration (rarer than hard ones)")
    seeds_per_prompt: int = option(3, help="seed instructions shown per generation prompt")
    rouge_threshold: float = option(0.7, help="novelty: keep iff ROUGE-L F to every pooled instruction <= this")
    referee_model: str | None = option(None, help="referee model name on the teacher's server; null = the teacher")
    student_batch_size: int = option(8, help="student answers generated together")
    student_max_new_tokens: int = option(64, help="student answer length")
    student_device: str = option("cpu", help="device of the student for inference")
    seed: int = option(0, help="sampling seed")
    training: StudentTraining = section(StudentTraining, help="student training per iteration")
    teacher: TeacherConfig = section(TeacherConfig, help="teacher backend, limits and prices (also the referee)")
    output_dir: str = option("", help="where iterations, pools and lion_summary.json go")
    progress: bool = option(False, help="show progress bars")

    def __post_init__(self) -> None:
        for name in ("train_pool", "student", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        for name in ("iterations", "seeds_per_prompt", "student_batch_size", "student_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1")
        if self.new_hard < 0 or self.new_easy < 0:
            raise ValueError("new_hard: expected >= 0 (and new_easy >= 0)")
        if not 0 < self.rouge_threshold <= 1:
            raise ValueError("rouge_threshold: expected a value in (0, 1]")


# ------------------------------------------------------------------------------------------------ helpers
def load_pool(path: str, field: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{field}: file not found: {p}")
    pool = []
    for number, _, record in iter_json_objects(p):
        text = record.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{p}:{number}: field 'instruction': expected a non-empty string")
        pool.append(text.strip())
    if not pool:
        raise ConfigError(f"{field}: {p} holds no instructions")
    return pool


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def answers(engine: Engine, prefix: str, instructions: list[str]) -> list[str | None]:
    results = await engine.map([Request(f"{prefix}-{i}", chat(text)) for i, text in enumerate(instructions)])
    if any(r is None for r in results):
        raise Stopped(
            engine.stopped or "interrupted", "stopped before all answers were in; rerun the same command to continue"
        )
    return [r.text if r.ok else None for r in results]


def referee_requests(n: int, pool: list[str], t_texts: list[str | None], s_texts: list[str | None]) -> list[Request]:
    """Two referee requests per instruction, teacher's answer first then student's first (against position bias)."""
    requests = []
    for i, (inst, t, s) in enumerate(zip(pool, t_texts, s_texts)):
        requests.append(
            Request(f"ref-{n}-{i}-ts", chat(REFEREE_TEMPLATE.format(instruction=inst, first=t or "", second=s or "")))
        )
        requests.append(
            Request(f"ref-{n}-{i}-st", chat(REFEREE_TEMPLATE.format(instruction=inst, first=s or "", second=t or "")))
        )
    return requests


# ------------------------------------------------------------------------------------------------ the loop
class Lion:
    """Runs iterations and their stages; all state lives under ``output_dir``."""

    def __init__(self, cfg: LionConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    def iteration_dir(self, n: int) -> Path:
        return self.out / f"iter_{n:03d}"

    def pools(self, n: int) -> dict[str, list[str]]:
        """Pools at the start of iteration ``n`` (those written by iteration n-1's generation, or the initial ones)."""
        if n == 1:
            return read_json(self.out / "pools_initial.json")
        return read_json(self.iteration_dir(n - 1) / "generation" / "done.json")["pools"]

    def student_at(self, n: int) -> str:
        """The student going into iteration ``n``."""
        return self.cfg.student if n == 1 else str(self.iteration_dir(n - 1) / "imitation" / "train" / "final")

    def teacher_engine(self, where: Path) -> Engine:
        return build_engine(self.cfg.teacher, where, progress=self.cfg.progress)

    # ------------------------------------------------------------------------------------------ stages
    def imitation(self, n: int) -> None:
        stage = self.iteration_dir(n) / "imitation"
        stage.mkdir(parents=True, exist_ok=True)
        pool = self.pools(n)["train"]

        async def collect() -> list[str | None]:
            engine = self.teacher_engine(self.out)
            try:
                return await answers(engine, f"teach-{n}", pool)
            finally:
                await engine.aclose()

        texts = asyncio.run(collect())
        rows = [{"prompt": p, "completion": t} for p, t in zip(pool, texts) if t and t.strip()]
        if not rows:
            raise ConfigError("teacher: no usable answer for the train pool")
        atomic_write_text(stage / "data.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.train_student(n, stage)
        atomic_write_json(stage / "done.json", {"examples": len(rows)}, ensure_ascii=False)

    def train_student(self, n: int, stage: Path) -> None:
        from distill.training import train
        from distill.training.config import training_config

        t = self.cfg.training
        local_teacher = self.cfg.teacher.backend == "local"
        # Logit KD needs the teacher's distributions: only possible with a local teacher (an API returns text).
        terms = {"forward_kl": t.kd_weight, "ce": 1.0 - t.kd_weight} if local_teacher else {"ce": 1.0}
        train_cfg = training_config(
            student=self.student_at(n),
            teacher=self.cfg.teacher.model if local_teacher else None,
            train_file=str(stage / "data.jsonl"),
            eval_fraction=0.0,
            max_length=t.max_length,
            output_dir=str(stage / "train"),
            loss_terms=terms,
            resume="auto",
            max_steps=t.max_steps,
            learning_rate=t.learning_rate,
            per_device_train_batch_size=t.batch_size,
            eval_steps=None,
            save_steps=max(1, t.max_steps // 2),
            report_to=("none",),
            seed=self.cfg.seed + n,
        )
        result = train.run(train_cfg)
        if result.stopped:
            raise Stopped(result.stopped)  # preempted: the checkpoint is saved, a rerun resumes the training

    def discrimination(self, n: int) -> None:
        stage = self.iteration_dir(n) / "discrimination"
        stage.mkdir(parents=True, exist_ok=True)
        pool = self.pools(n)["cache"]
        student_dir = str(self.iteration_dir(n) / "imitation" / "train" / "final")
        cfg = self.cfg
        student_cfg = TeacherConfig(
            backend="local",
            model=student_dir,
            batch_size=cfg.student_batch_size,
            device=cfg.student_device,
            decoding=DecodingConfig(temperature=0.0, max_tokens=cfg.student_max_new_tokens),
            concurrency=64,
            cache_path=str(stage / "student_cache.sqlite"),
        )
        referee_cfg = dataclasses.replace(
            cfg.teacher,
            model=cfg.referee_model or cfg.teacher.model,
            decoding=DecodingConfig(temperature=0.0, max_tokens=32),
        )

        async def judge() -> list[dict[str, Any]]:
            teacher = self.teacher_engine(self.out)
            student = build_engine(student_cfg, stage, progress=cfg.progress)
            referee = build_engine(referee_cfg, self.out, progress=cfg.progress)
            try:
                t_texts = await answers(teacher, f"cache-{n}", pool)
                s_texts = await answers(student, f"student-{n}", pool)
                scored = await referee.map(referee_requests(n, pool, t_texts, s_texts), parse_scores)
                if any(r is None for r in scored):
                    raise Stopped(
                        referee.stopped or "interrupted",
                        "stopped before all referee scores were in; rerun the same command to continue",
                    )
                return verdicts(pool, scored, cfg.hard_threshold)
            finally:
                for engine in (teacher, student, referee):
                    await engine.aclose()

        items = asyncio.run(judge())
        atomic_write_json(stage / "done.json", discrimination_result(items), ensure_ascii=False)

    def generation(self, n: int) -> None:
        from data_gen.rouge import NoveltyIndex

        stage = self.iteration_dir(n) / "generation"
        stage.mkdir(parents=True, exist_ok=True)
        pools = self.pools(n)
        judged = read_json(self.iteration_dir(n) / "discrimination" / "done.json")["items"]
        hard = [it["instruction"] for it in judged if it.get("hard")]
        easy = [it["instruction"] for it in judged if "skipped" not in it and not it["hard"]]
        rng = random.Random(f"{self.cfg.seed}:{n}")
        requests = []
        for kind, seeds, template, count in (
            ("hard", hard, HARD_TEMPLATE, self.cfg.new_hard),
            ("easy", easy, EASY_TEMPLATE, self.cfg.new_easy),
        ):
            if seeds and count:
                shown = rng.sample(seeds, min(self.cfg.seeds_per_prompt, len(seeds)))
                text = template.format(examples="".join(f"- {s}\n" for s in shown), n=count)
                requests.append(Request(f"gen-{n}-{kind}", chat(text), meta={"kind": kind, "count": count}))

        async def generate() -> list[Any]:
            engine = self.teacher_engine(self.out)
            try:
                results = await engine.map(requests, parse_instructions)
                if any(r is None for r in results):
                    raise Stopped(
                        engine.stopped or "interrupted",
                        "stopped before all instructions were generated; rerun the same command to continue",
                    )
                return results
            finally:
                await engine.aclose()

        novelty = NoveltyIndex(threshold=self.cfg.rouge_threshold)
        for text in dict.fromkeys(pools["train"] + pools["cache"]):
            novelty.add(text)
        added: dict[str, list[str]] = {"hard": [], "easy": []}
        rejected = 0
        for result in asyncio.run(generate()):
            if not result.ok:
                rejected += 1
                continue
            for text in result.parsed[: result.request.meta["count"]]:
                if novelty.is_novel(text):
                    novelty.add(text)
                    added[result.request.meta["kind"]].append(text)
                else:
                    rejected += 1
        new = added["hard"] + added["easy"]
        grown = {"train": pools["train"] + new, "cache": pools["cache"] + new}
        atomic_write_json(
            stage / "done.json", {"added": added, "rejected_not_novel": rejected, "pools": grown}, ensure_ascii=False
        )

    # ------------------------------------------------------------------------------------------ driver
    def iterate(self) -> dict[str, Any]:
        """Every iteration's unfinished stages, then :meth:`summary`."""
        if not (self.out / "pools_initial.json").is_file():
            train = load_pool(self.cfg.train_pool, "train_pool")  # checked before anything is written
            cache = load_pool(self.cfg.cache_pool, "cache_pool") if self.cfg.cache_pool else list(train)
            ownership.held(self.out).claim()
            atomic_write_json(self.out / "pools_initial.json", {"train": train, "cache": cache}, ensure_ascii=False)
        else:
            ownership.held(self.out).claim()
        save_config(self.cfg, self.out / "config.yaml")
        for n in range(1, self.cfg.iterations + 1):
            for name, stage in (
                ("imitation", self.imitation),
                ("discrimination", self.discrimination),
                ("generation", self.generation),
            ):
                if not (self.iteration_dir(n) / name / "done.json").is_file():
                    print(f"iteration {n}: {name}", flush=True)
                    stage(n)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        rows = []
        for n in range(1, self.cfg.iterations + 1):
            d = read_json(self.iteration_dir(n) / "discrimination" / "done.json")
            g = read_json(self.iteration_dir(n) / "generation" / "done.json")
            pools = self.pools(n)
            rows.append(
                {
                    "iteration": n,
                    "train_pool": len(pools["train"]),
                    "cache_pool": len(pools["cache"]),
                    "hard": d["hard"],
                    "easy": d["easy"],
                    "skipped": d["skipped"],
                    "hard_ratio": d["hard"] / max(1, d["hard"] + d["easy"]),
                    "win_rate": d["win_rate"],
                    "mean_teacher": d["mean_teacher"],
                    "mean_student": d["mean_student"],
                    "new_hard": len(g["added"]["hard"]),
                    "new_easy": len(g["added"]["easy"]),
                }
            )
        summary = {"iterations": rows}
        atomic_write_json(self.out / "lion_summary.json", summary, ensure_ascii=False)
        print(
            f"{'iter':>4} {'train':>6} {'cache':>6} {'hard':>5} {'easy':>5} {'win rate':>9} {'+hard':>6} {'+easy':>6}"
        )
        for r in rows:
            win = "n/a" if r["win_rate"] is None else f"{r['win_rate']:.3f}"
            print(
                f"{r['iteration']:>4} {r['train_pool']:>6} {r['cache_pool']:>6} {r['hard']:>5} {r['easy']:>5} "
                f"{win:>9} {r['new_hard']:>6} {r['new_easy']:>6}"
            )
        return summary


def lion_settings(cfg: LionConfig) -> dict[str, Any]:
    """What a rerun must share with the run in ``output_dir`` to continue it (the ownership marker's settings)."""
    return {
        "train_pool": cfg.train_pool,
        "cache_pool": cfg.cache_pool,
        "student": cfg.student,
        "seed": cfg.seed,
        "teacher.model": cfg.teacher.model,
    }


# What `data-gen lion` writes in its output_dir (kd_core.ownership); an unmarked Lion run of an earlier version is
# recognised by its pools.
OUTPUT = ownership.OutputKind(
    "data-gen lion",
    ("config.yaml", "pools_initial.json", "iter_*", "lion_summary.json", "cache.sqlite*", ".*.tmp"),
    legacy=lambda d: (d / "pools_initial.json").is_file() or (d / "lion_summary.json").is_file(),
    done="lion_summary.json",
)


def prepare_output_dir(cfg: LionConfig) -> ownership.Output:
    """Continue only a Lion run with the same pools, student, seed and teacher; refuse any other directory (a
    training run, another command's output, a user's folder, one another process writes) before anything is
    written; the returned output holds the directory's lock."""
    return ownership.prepare(
        cfg.output_dir, OUTPUT, lion_settings(cfg), resume=True, overwrite=False, remedy="choose another output_dir"
    )


Config = LionConfig


@dataclass
class LionResult:
    """What :func:`run` returns."""

    output_dir: Path
    summary: dict[str, Any] | None  # the content of lion_summary.json; None when a stage stopped early
    stopped: str | None = None  # why a stage stopped early (engine: 'budget', 'interrupted'; training: 'preempted')


def run(cfg: LionConfig) -> LionResult:
    """Runs the iterations under ``cfg.output_dir``, continuing unfinished ones; returns the win-rate summary."""
    if not Path(cfg.student).is_dir():
        raise ConfigError(f"student: model directory not found: {cfg.student}")
    with prepare_output_dir(cfg):
        try:
            return LionResult(Path(cfg.output_dir), Lion(cfg).iterate())
        except Stopped as stop:  # budget cap, Ctrl-C or SIGTERM: everything paid for is saved
            if stop.message:
                print(stop.message)
            return LionResult(Path(cfg.output_dir), None, stop.reason)
        except EngineError as err:  # e.g. an unreachable teacher after bounded retries
            raise ConfigError(str(err)) from None


def main(argv: list[str]) -> int:
    cfg = parse_command_line(LionConfig, argv, "data-gen lion", __doc__.split("\n\n")[0])
    return stop_code(run(cfg).stopped)
