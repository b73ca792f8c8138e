"""Loading the teacher, the student and their tokenizer, with the checks that must happen before training."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kd_core.config import ConfigError, option
from kd_core.pretrained import check_gguf, is_gguf, load_causal_lm, load_config
from kd_core.pretrained import load_tokenizer as load_pretrained_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ModelSettings:
    teacher: str | None = option(
        None, help="Teacher model directory (anything `AutoModelForCausalLM.from_pretrained` loads) or a .gguf file "
        "(dequantized on load); may be unset for plain fine-tuning (loss terms `ce` only)."
    )
    student: str | None = option(
        None, help="Student model directory or .gguf file. If unset, the student is built from the teacher's config "
        "and `student_overrides`."
    )
    student_overrides: dict[str, Any] = option(
        {}, help="Config fields changed from the teacher's to build a randomly initialised student, e.g. "
        "{num_hidden_layers: 2, hidden_size: 256, intermediate_size: 512}."
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="Teacher weights dtype; `auto` = bfloat16 when training in bf16, else float32."
    )
    attn_implementation: Literal["sdpa", "eager"] = option(
        "sdpa", help="Attention kernel for both models; attention-map losses need `eager`."
    )
    task: Literal["auto", "causal_lm", "encoder"] = option(
        "auto", help="`causal_lm` loads AutoModelForCausalLM (logit and feature losses); `encoder` loads AutoModel "
        "(BERT family: feature and relation losses only). `auto` reads the teacher's (or student's) architectures."
    )

    def __post_init__(self) -> None:
        if not self.teacher and not self.student:
            raise ValueError("teacher: a teacher (or, for plain fine-tuning, a student) model directory is required")


def require_model_dir(path: str, field: str) -> Path:
    """A Hugging Face model directory (with config.json) or a readable GGUF file (checked without loading weights)."""
    if is_gguf(path):
        check_gguf(path, field)
        return Path(path)
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{field}: expected a model directory with config.json or a .gguf file, got {path!r}")
    return directory


def resolve_task(settings: ModelSettings) -> str:
    """``causal_lm`` or ``encoder``: from the setting, or from the architectures a model directory declares."""
    if settings.task != "auto":
        return settings.task
    source = settings.teacher or settings.student
    if is_gguf(source):
        return "causal_lm"  # transformers reads GGUF files of decoder LMs only
    architectures = AutoConfig.from_pretrained(source).architectures or []
    return "causal_lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) else "encoder"


def _model_class(task: str):
    return AutoModelForCausalLM if task == "causal_lm" else AutoModel


def check_paths(settings: ModelSettings) -> None:
    """Fails fast on missing model directories, before any weights load."""
    if settings.teacher:
        require_model_dir(settings.teacher, "model.teacher")
    if settings.student:
        require_model_dir(settings.student, "model.student")


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    """The student's tokenizer (the teacher's when the student is built from its config), checked against the
    teacher's: distillation over logits needs the same vocabulary, not just the same size."""
    if not settings.student:
        tokenizer = load_pretrained_tokenizer(settings.teacher, "model.teacher")
    else:
        tokenizer = load_pretrained_tokenizer(settings.student, "model.student")
        teacher_tok = load_pretrained_tokenizer(settings.teacher, "model.teacher") if settings.teacher else tokenizer
        if tokenizer.get_vocab() != teacher_tok.get_vocab():
            raise ConfigError(
                f"tokenizer mismatch: student {settings.student} ({len(tokenizer)} tokens) and teacher "
                f"{settings.teacher} ({len(teacher_tok)} tokens) have different vocabularies; logit distillation "
                "needs the same tokenizer"
            )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the collator needs an id; padded positions are masked anyway
    return tokenizer


def _load(path: str, field: str, task: str, dtype: torch.dtype, attn_implementation: str) -> PreTrainedModel:
    if is_gguf(path):
        if task != "causal_lm":
            raise ConfigError(f"{field}: {path}: a GGUF file holds a causal LM; model.task {task!r} needs a directory")
        return load_causal_lm(path, field, dtype, attn_implementation=attn_implementation)
    return _model_class(task).from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)


def load_teacher(settings: ModelSettings, bf16: bool, task: str = "causal_lm") -> PreTrainedModel:
    dtype = DTYPES.get(settings.teacher_dtype) or (torch.bfloat16 if bf16 else torch.float32)
    teacher = _load(settings.teacher, "model.teacher", task, dtype, settings.attn_implementation)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def load_student(settings: ModelSettings, seed: int, task: str = "causal_lm") -> PreTrainedModel:
    """From its directory, or a fresh model from the teacher's config with ``student_overrides`` applied."""
    if settings.student:
        return _load(settings.student, "model.student", task, torch.float32, settings.attn_implementation)
    config = load_config(settings.teacher, "model.teacher")
    for key, value in settings.student_overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"model.student_overrides.{key}: the teacher's config has no field {key!r}")
        setattr(config, key, value)
    if "num_hidden_layers" in settings.student_overrides and getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: config.num_hidden_layers]  # per-layer lists must match the depth
    config._attn_implementation = settings.attn_implementation
    torch.manual_seed(seed)
    return _model_class(task).from_config(config, dtype=torch.float32)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
