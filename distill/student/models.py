"""Loading the teacher, the student and their tokenizer, with the checks that must happen before training."""

from __future__ import annotations

import dataclasses
import json
import struct
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
    teacher_tokenizer: str | None = option(
        None, help="With loss.cross_tokenizer: the teacher's tokenizer (a directory, or a .gguf file), when it is not "
        "the one in model.teacher's directory."
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def require_model_dir(path: str | Path, field: str, *, tokenizer: bool = True) -> Path:
    """A Hugging Face model directory or a readable GGUF file, checked without loading weights: config.json is a JSON
    object, weights are there (``*.safetensors`` or ``pytorch_model*.bin``; every shard an index names) and each
    safetensors file is whole (its header parses and its tensors end where the file ends), and (``tokenizer``) the
    directory has tokenizer files. Anything else is one ConfigError naming ``field``, the file and what was expected.
    Used by train, prune, eval and precompute."""
    if is_gguf(path):
        check_gguf(path, field)
        return Path(path)
    directory = Path(path)
    expected = f"{field}: expected a model directory with config.json or a .gguf file, got {str(path)!r}"
    if not directory.exists():
        raise ConfigError(f"{expected} (not a model directory: not found)")
    if not directory.is_dir():
        raise ConfigError(f"{expected} (not a model directory: a file)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{expected} (not a model directory: no config.json)")
    try:
        config = json.loads(config_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{field}: {config_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{field}: {config_file}: expected a JSON object of model settings, got "
                          f"{type(config).__name__}")
    _check_weights(directory, field)
    if tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{field}: {directory} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)}; "
                          "save it with tokenizer.save_pretrained)")
    return directory


def _check_weights(directory: Path, field: str) -> None:
    safetensors = sorted(directory.glob("*.safetensors"))
    if not safetensors and not any(directory.glob("pytorch_model*.bin")):
        raise ConfigError(f"{field}: {directory} has no weights (expected *.safetensors or pytorch_model*.bin)")
    for index in directory.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_bytes())["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{field}: {index} is not a valid safetensors index (no weight_map)") from None
        missing = sorted(name for name in shards if not (directory / name).is_file())
        if missing:
            raise ConfigError(f"{field}: {index} names shard(s) that are missing: {', '.join(missing)}")
    for file in safetensors:
        problem = _safetensors_problem(file)
        if problem:
            raise ConfigError(f"{field}: {file} is truncated or corrupt ({problem}); save or download it again")


def _safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file is not whole (None if it is): an 8-byte header length, a JSON header of that length,
    and tensor data that ends exactly at the end of the file."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        length = struct.unpack("<Q", head)[0]
        if 8 + length > size:
            return f"header of {length} bytes but the file has {size}"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "the header is not JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "a tensor entry has no data_offsets"
    if 8 + length + end != size:
        return f"the tensors need {8 + length + end} bytes but the file has {size}"
    return None


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
        require_model_dir(settings.teacher, "model.teacher", tokenizer=not settings.teacher_tokenizer)
    if settings.teacher_tokenizer and not is_gguf(settings.teacher_tokenizer):
        folder = Path(settings.teacher_tokenizer)
        if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(f"model.teacher_tokenizer: expected a tokenizer directory (one of "
                              f"{', '.join(TOKENIZER_FILES)}) or a .gguf file, got {str(folder)!r}")
    if settings.student:
        require_model_dir(settings.student, "model.student")
    check_student_overrides(settings)


def check_student_overrides(settings: ModelSettings) -> None:
    """The overrides of a student built from the teacher's config name fields of that config and give a shape the
    model class accepts (at least one layer; heads that divide the hidden size; key/value heads that divide the
    heads); otherwise one ConfigError naming ``model.student_overrides.<field>``. Reads only the config."""
    overrides = settings.student_overrides
    if settings.student or not settings.teacher or not overrides:
        return
    config = load_config(settings.teacher, "model.teacher")
    prefix = "model.student_overrides."
    for key in overrides:
        if not hasattr(config, key):
            raise ConfigError(f"{prefix}{key}: the teacher's config has no field {key!r}")
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                "intermediate_size", "head_dim"):
        value = overrides.get(key)
        nullable = key in ("num_key_value_heads", "head_dim") and value is None
        if key in overrides and not nullable and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{prefix}{key}: expected a positive integer, got {value!r}")

    def value_of(key: str) -> Any:
        return overrides[key] if key in overrides else getattr(config, key, None)

    heads, hidden, kv_heads = value_of("num_attention_heads"), value_of("hidden_size"), value_of("num_key_value_heads")
    changed = set(overrides)
    if isinstance(heads, int) and isinstance(hidden, int) and {"num_attention_heads", "hidden_size"} & changed \
            and hidden % heads:
        name = "num_attention_heads" if "num_attention_heads" in overrides else "hidden_size"
        raise ConfigError(f"{prefix}{name}: num_attention_heads ({heads}) must divide hidden_size ({hidden})")
    if isinstance(heads, int) and isinstance(kv_heads, int) and {"num_attention_heads", "num_key_value_heads"} & changed \
            and heads % kv_heads:
        name = "num_key_value_heads" if "num_key_value_heads" in overrides else "num_attention_heads"
        raise ConfigError(f"{prefix}{name}: num_key_value_heads ({kv_heads}) must divide num_attention_heads "
                          f"({heads})")


def load_tokenizer(settings: ModelSettings, same_vocabulary: bool = True) -> PreTrainedTokenizerBase:
    """The student's tokenizer (the teacher's when the student is built from its config), checked against the
    teacher's: distillation over logits needs the same vocabulary, not just the same size (unless
    ``same_vocabulary`` is False: cross-tokenizer distillation loads the teacher's on its own)."""
    if not settings.student:
        tokenizer = load_pretrained_tokenizer(settings.teacher, "model.teacher")
    else:
        tokenizer = load_pretrained_tokenizer(settings.student, "model.student")
        teacher_tok = load_pretrained_tokenizer(settings.teacher, "model.teacher") if settings.teacher and \
            same_vocabulary else tokenizer
        if tokenizer.get_vocab() != teacher_tok.get_vocab():
            raise ConfigError(
                f"tokenizer mismatch: student {settings.student} ({len(tokenizer)} tokens) and teacher "
                f"{settings.teacher} ({len(teacher_tok)} tokens) have different vocabularies; logit distillation "
                "needs the same tokenizer, or loss.cross_tokenizer (uld or gold)"
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
