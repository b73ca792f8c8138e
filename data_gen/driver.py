"""The one driver of the journaled data-gen pipelines (``data-gen self-instruct``, ``data-gen cot``).

A pipeline is a :class:`Method`: it loads its inputs, builds the teacher prompts, parses and filters the answers,
journals one record per finished unit of work (an instruction, a question) and turns journal records into data rows.
The driver owns everything around that, identically for every method:

1. the output directory: an empty or absent one starts a run; one owned by the same method
   (:mod:`kd_core.ownership`: its marker, or for an earlier version's output its ``config.yaml``) holding
   ``config.yaml`` (and ``journal.jsonl``, where :attr:`Method.journal_required`) of a run with the same
   :meth:`Method.resume_keys` resumes; anything else (another method's output, a training run, a user's folder, a
   directory another process is writing) is refused (exit 2, untouched). The main process holds the directory's
   lock until the run ends;
2. the pre-flight cost estimate (:meth:`Method.plan` for the work left after the journal), before anything is
   created on disk, so an estimate over the budget leaves no trace;
3. the engine (answer cache, limits, signal handlers: SIGINT/SIGTERM and the budget cap stop it cleanly), the
   journal (``journal.jsonl``, the resumable state) and the resolved ``config.yaml``;
4. the final outputs, rebuilt from the journal however the run ended: ``data.jsonl``/``data.parquet``, the dataset
   card ``README.md``, for a method with :meth:`Method.stats`, ``stats.json``, and with ``teacher.logprobs`` the
   store of the captured log-probabilities, ``teacher_store/`` (:mod:`data_gen.logprobs`, whose server check runs
   before the first paid call);
5. the ending: an :class:`~data_gen.engine.EngineError` becomes a one-line error (exit 2), a stopped engine a
   :class:`GenerationResult` with ``stopped`` set (exit :data:`~kd_core.commands.EXIT_STOPPED`, rerun to continue).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_gen.config import OutputConfig, TeacherConfig
from data_gen.engine import BudgetError, CallPlan, Engine, EngineError, build_engine, preflight
from data_gen.journal import Journal
from data_gen.logprobs import STORE_DIR, check_server, load_teacher_tokenizer, mark_vocabulary, write_store
from data_gen.output import write_outputs
from kd_core import ownership
from kd_core.atomic import atomic_write_json
from kd_core.config import ConfigError, save_config
from kd_core.redact import scrub

JOURNAL = "journal.jsonl"
CONFIG = "config.yaml"
STATS = "stats.json"


@dataclass
class GenerationResult:
    """What a data-gen ``run`` returns."""

    output_dir: Path
    records: int  # journal records in the data files (instructions, questions)
    rows: int  # data rows written (instances, rationales)
    files: list[Path] = field(default_factory=list)  # data files written (main process only)
    stats: dict[str, Any] | None = None  # the method's stats.json, if it has one
    stopped: str | None = None  # why the engine stopped early ('budget', 'interrupted', ...); None = finished


class Method:
    """What a pipeline supplies to :func:`run`. ``cfg`` has ``teacher`` and ``output`` sections."""

    name: str  # the command's name, as in "<dir> is not a <name> output directory" and the progress bar
    unit: str  # progress-bar unit of one journal record
    cfg: Any
    # Whether a directory to resume must hold journal.jsonl (else a lost journal is rebuilt from the answer cache).
    journal_required: bool = True
    # Top-level keys of config.yaml that tell the method's unmarked output of a version before ownership markers.
    legacy_keys: tuple[str, ...] = ()
    # With teacher.logprobs: the teacher's tokenizer (set by the driver before generate), for a method that must
    # find where its rows lie in an answer's generated ids.
    teacher_tokenizer: Any = None

    def resume_keys(self) -> dict[str, Any]:
        """Dotted config keys (and their values now) that must equal the saved ``config.yaml``'s to resume."""
        raise NotImplementedError

    def total(self) -> int:
        """Journal records a finished run holds (the progress bar's total)."""
        raise NotImplementedError

    def plan(self, remaining: int) -> list[CallPlan]:
        """The pre-flight estimate of the calls for ``remaining`` more records."""
        raise NotImplementedError

    async def generate(self, engine: Engine, journal: Journal) -> None:
        """Prompts, calls (through ``engine``), parses and journals until done or ``engine.stopped``."""
        raise NotImplementedError

    def records(self, journal: Journal) -> list[dict[str, Any]]:
        """The journal records that make up the data files, in order."""
        return list(journal.records.values())

    def rows(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The data rows of ``records``."""
        raise NotImplementedError

    def summary(self, engine_summary: str, records: list[dict[str, Any]]) -> str:
        """The run summary printed and put in the card (the engine's, plus anything the method counts)."""
        return engine_summary

    def card(self, records: list[dict[str, Any]], rows: list[dict[str, Any]], summary: str) -> str:
        """The dataset card (``README.md``), see :func:`data_gen.output.dataset_card`."""
        raise NotImplementedError

    def stats(self, records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The content of ``stats.json``; None writes none."""
        return None

    def done_line(self, records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
        """What was made, printed as ``<this> in <output dir>``."""
        raise NotImplementedError


def output_kind(method: Method) -> ownership.OutputKind:
    """What a journaled pipeline writes in its output directory (:mod:`kd_core.ownership`); an unmarked output of
    an earlier version is recognised by its ``config.yaml`` holding the method's resume keys."""

    def legacy(directory: Path) -> bool:
        return bool(method.legacy_keys) and all(_saved(directory, key) is not None for key in method.legacy_keys)

    owned = (CONFIG, JOURNAL, "cache.sqlite*", "data.jsonl", "data.parquet", "README.md", STATS, STORE_DIR, ".*.tmp")
    return ownership.OutputKind(
        f"data-gen {method.name}",
        owned,
        label=method.name,
        legacy=legacy,
        done=STATS if type(method).stats is not Method.stats else None,
    )


def _saved(out: Path, key: str) -> Any:
    """The value of dotted ``key`` in ``out/config.yaml`` (None when absent)."""
    import yaml

    try:
        value: Any = yaml.safe_load((out / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def prepare_output_dir(method: Method, out: Path) -> ownership.Output:
    """Resume only a run of the same method with the same resume keys; never write into an unrelated directory
    (another method's output, a training run, a user's folder) nor one another process writes; the main process
    locks it (:mod:`kd_core.ownership`)."""

    def resumable(owner: ownership.Owner) -> str | None:
        # A marked run killed before it saved config.yaml resumes on its marker's settings; an unmarked one (an
        # earlier version's) is known only by its config.yaml, and its journal where the method needs one.
        config = (out / CONFIG).is_file()
        if (owner.inferred and not config) or (config and method.journal_required and not (out / JOURNAL).is_file()):
            raise ConfigError(f"output.dir: {out} exists and is not a {method.name} output directory; choose a new one")
        for key, now in method.resume_keys().items():
            if config and _saved(out, key) != now:
                raise ConfigError(
                    f"{key}: {out} was generated with {_saved(out, key)!r}, not {now!r}; use a new output.dir"
                )
        return None

    return ownership.prepare(
        out,
        output_kind(method),
        method.resume_keys(),
        resume=True,
        overwrite=False,
        field="output.dir",
        check=resumable,
    )


def run(method: Method) -> GenerationResult:
    """Runs ``method`` to completion or to a clean stop (see the module docstring)."""
    return asyncio.run(_drive(method))


async def _drive(method: Method) -> GenerationResult:
    out = Path(method.cfg.output.dir)
    with prepare_output_dir(method, out) as prepared:
        return await _generate(method, prepared)


async def _generate(method: Method, prepared: ownership.Output) -> GenerationResult:
    teacher: TeacherConfig = method.cfg.teacher
    output: OutputConfig = method.cfg.output
    out = prepared.path
    total = method.total()
    remaining = max(0, total - Journal.count(out / JOURNAL))
    try:
        # Before anything is created on disk: an estimate over the budget must leave no trace.
        preflight(teacher, method.plan(remaining))
    except BudgetError as err:
        raise ConfigError(str(err)) from None
    tokenizer = method.teacher_tokenizer = await _logprobs_tokenizer(teacher, probe=remaining > 0)
    engine = build_engine(teacher, out, progress=output.progress)  # ConfigError on a missing API key
    if engine.rank == 0:
        prepared.claim()
    journal = Journal(out / JOURNAL)
    try:
        journal.open()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if engine.rank == 0:
        save_config(method.cfg, out / CONFIG)
    error: EngineError | None = None
    result = GenerationResult(out, 0, 0)
    try:
        engine.install_signal_handlers()
        engine.open_progress(total, method.name, unit=method.unit, initial=min(len(journal), total))
        try:
            await method.generate(engine, journal)
        except EngineError as err:
            error = err
    finally:
        engine.close_progress()
        journal.close()
        # The data files hold every journaled record, however this run ended.
        records = method.records(journal)
        rows = method.rows(records)
        if tokenizer is not None:  # the vocabulary of the captured ids: distill trains on them with that vocabulary
            mark_vocabulary(rows, tokenizer)
        summary = method.summary(engine.summary(), records)
        result.records, result.rows = len(records), len(rows)
        result.stats = method.stats(records, rows)
        if engine.rank == 0:  # under accelerate launch, one process writes files
            result.files = write_outputs(rows, out, output.formats, method.card(records, rows, summary))
            if result.stats is not None:
                atomic_write_json(out / STATS, result.stats)  # the quickstart trusts it as "stage done"
            if tokenizer is not None:
                store = write_store(out, rows, engine.cache, teacher, tokenizer, result.files)
                print(f"teacher log-probabilities (top {teacher.logprobs}): {store}")
            print(summary)
            print(f"{method.done_line(records, rows)} in {out}")
        await engine.aclose()
    if error is not None:
        raise ConfigError(str(error))
    if engine.rank == 0 and not engine.stopped:
        prepared.finish()
    if engine.stopped:
        print(f"stopped early ({engine.stopped}); rerun the same command to continue")
        result.stopped = engine.stopped
    return result


async def _logprobs_tokenizer(teacher: TeacherConfig, probe: bool) -> Any:
    """The teacher's tokenizer for the store; with ``probe`` (calls are left to make), once the server has passed
    :func:`data_gen.logprobs.check_server`, before anything is created on disk. A finished run's rerun only rebuilds
    the store from the cache: it needs no server. None without ``teacher.logprobs``."""
    from data_gen.backends import ApiBackend
    from data_gen.engine import teacher_secrets

    if not teacher.logprobs:
        return None
    if not probe:
        return load_teacher_tokenizer(teacher.tokenizer)
    backend = ApiBackend(teacher)  # ConfigError on a missing key, before any call
    try:
        return await check_server(teacher, backend, lambda text: scrub(text, teacher_secrets(teacher)))
    finally:
        await backend.aclose()
