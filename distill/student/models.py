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

from kd_core.config import ConfigError, option, section
from kd_core.pretrained import check_gguf, is_gguf, load_causal_lm, load_config
from kd_core.pretrained import load_tokenizer as load_pretrained_tokenizer
from kd_core.redact import check_env_var_name, redact_urls
from kd_core.served_limits import ServedLimits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The attention kernels transformers 5.24 dispatches to (modeling_utils.AttentionInterface, plus eager); which of
# them can run here is checked up front (check_attention).
ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")


@dataclasses.dataclass
class ModelSettings:
    teacher: str | None = option(
        None,
        help="Teacher model directory (anything `AutoModelForCausalLM.from_pretrained` loads) or a .gguf file "
        "(dequantized on load); may be unset for plain fine-tuning (loss terms `ce` only).",
    )
    student: str | None = option(
        None,
        help="Student model directory or .gguf file. If unset, the student is built from the teacher's config "
        "and `student_overrides`.",
    )
    student_overrides: dict[str, Any] = option(
        {},
        help="Config fields changed from the teacher's to build a randomly initialised student, e.g. "
        "{num_hidden_layers: 2, hidden_size: 256, intermediate_size: 512}.",
    )
    teacher_tokenizer: str | None = option(
        None,
        help="With loss.cross_tokenizer: the teacher's tokenizer (a directory, or a .gguf file), when it is not "
        "the one in model.teacher's directory.",
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto",
        help="Teacher weights dtype; `auto` = bfloat16 when training in bf16 or on a GPU with bf16 support "
        "(the frozen teacher needs no fp32 master weights), else float32.",
    )
    attn_implementation: Literal[ATTENTION] = option(  # type: ignore[valid-type]
        "sdpa",
        help="Attention kernel for both models: sdpa, eager, flex_attention, flash_attention_2/3/4 (checked "
        "against what is installed); attention-map losses need `eager`. Packed rows run varlen (one row, "
        "position ids) under flash_attention_*, a block-diagonal mask otherwise.",
    )
    gradient_checkpointing: bool = option(
        False,
        help="Recompute the student's layer activations in the backward pass (non-reentrant, "
        "use_reentrant=False) instead of keeping them: activation memory of one layer instead of all, for about "
        "one extra forward pass; works with LoRA and ZeRO-3. The teacher never keeps activations (no_grad).",
    )
    teacher_url: str | None = option(
        None,
        help="A served teacher instead of teacher weights: the OpenAI-compatible base URL (vLLM, SGLang: ending in "
        "/v1) whose prompt log-probabilities of each micro-batch's tokens are the targets (top loss.served_topk plus "
        "the tail); the server must use the student's tokenizer (checked on a probe at start). Needs model.student.",
    )
    teacher_model: str | None = option(None, help="With teacher_url: the model name the server serves.")
    teacher_api_key_env: str | None = option(
        None, help="With teacher_url: the environment variable holding its API key; null for a server without auth."
    )
    teacher_served: ServedLimits = section(
        ServedLimits,
        help="With teacher_url: scoring calls in flight per process (adaptive), rate limits, retries (then the run "
        "saves the position its step began from and stops, exit 3; --resume auto continues), prices and a budget.",
    )
    task: Literal["auto", "causal_lm", "encoder"] = option(
        "auto",
        help="`causal_lm` loads AutoModelForCausalLM (logit and feature losses); `encoder` loads AutoModel "
        "(BERT family: feature and relation losses only). `auto` reads the teacher's (or student's) architectures.",
    )

    def __post_init__(self) -> None:
        if not self.teacher and not self.student:
            raise ValueError("teacher: a teacher (or, for plain fine-tuning, a student) model directory is required")
        if self.teacher_url is not None:
            self._check_served_teacher()
        elif self.teacher_model is not None or self.teacher_api_key_env is not None:
            raise ValueError("teacher_model: only used with teacher_url (a served teacher)")

    def _check_served_teacher(self) -> None:
        """A served teacher replaces the teacher's weights: a student must be given, and the server named."""
        check_env_var_name("teacher_api_key_env", self.teacher_api_key_env)
        if not self.teacher_url.startswith(("http://", "https://")):
            raise ValueError(f"teacher_url: expected an http(s):// base URL, got {redact_urls(self.teacher_url)!r}")
        if self.teacher:
            raise ValueError("teacher: leave it unset with teacher_url (the server is the teacher)")
        if not self.student:
            raise ValueError("student: a served teacher (teacher_url) needs a student model directory or .gguf file")
        if not self.teacher_model:
            raise ValueError("teacher_model: the model name the server at teacher_url serves is required")


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


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
        raise ConfigError(
            f"{field}: {config_file}: expected a JSON object of model settings, got {type(config).__name__}"
        )
    _check_weights(directory, field)
    if tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{field}: {directory} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)}; "
            "save it with tokenizer.save_pretrained)"
        )
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
    """Fails fast on missing model directories, an attention kernel or checkpointing the models cannot run, before
    any weights load and before anything is written."""
    if settings.teacher:
        require_model_dir(settings.teacher, "model.teacher", tokenizer=not settings.teacher_tokenizer)
    if settings.teacher_tokenizer and not is_gguf(settings.teacher_tokenizer):
        folder = Path(settings.teacher_tokenizer)
        if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(
                f"model.teacher_tokenizer: expected a tokenizer directory (one of "
                f"{', '.join(TOKENIZER_FILES)}) or a .gguf file, got {str(folder)!r}"
            )
    if settings.student:
        require_model_dir(settings.student, "model.student")
    check_student_overrides(settings)
    check_attention(settings.attn_implementation)
    task = resolve_task(settings)
    for field in ("teacher", "student"):
        path = getattr(settings, field) or (settings.teacher if field == "student" else None)
        if path:  # a student built from the teacher's config has the teacher's class
            check_model_class(settings, load_config(path, f"model.{field}"), task, field)


def installed_attention() -> list[str]:
    """The attention kernels that can train on this machine: eager and sdpa always; flex_attention with torch's
    ``torch.nn.attention.flex_attention`` (torch >= 2.5) and a CUDA device (torch 2.13 has no flex backward on
    CPU); flash_attention_N where transformers finds its package (flash_attn, flash_attn_interface for 3,
    flash_attn.cute for 4) and a CUDA device."""
    import importlib.util

    from transformers.utils import import_utils

    names = ["sdpa", "eager"]
    if torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        names.append("flex_attention")
    for version in (2, 3, 4):
        # transformers 5.24 has all three checks; older 5.x releases lack the newer ones (then: not installed).
        check = getattr(import_utils, f"is_flash_attn_{version}_available", None)
        if check is not None and check():
            names.append(f"flash_attention_{version}")
    return names


def check_attention(name: str) -> None:
    installed = installed_attention()
    if name not in installed:
        raise ConfigError(
            f"model.attn_implementation: {name!r} cannot run here (its package or a CUDA device is "
            f"missing); this machine supports {', '.join(installed)}"
        )


def check_model_class(settings: ModelSettings, config, task: str, field: str) -> None:
    """The model class of ``config`` implements the attention kernel and (student) gradient checkpointing."""
    mapping = AutoModelForCausalLM._model_mapping if task == "causal_lm" else AutoModel._model_mapping
    if type(config) not in mapping:
        return  # a class transformers does not map is refused where it loads, with its own message
    cls = mapping[type(config)]
    kernel = settings.attn_implementation
    flags = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}
    supported = kernel == "eager" or bool(getattr(cls, flags.get(kernel, "_supports_flash_attn")))
    if not supported:
        raise ConfigError(
            f"model.attn_implementation: {config.model_type} ({cls.__name__}) does not implement "
            f"{kernel!r}; use sdpa or eager for model.{field}"
        )
    if field == "student" and settings.gradient_checkpointing and not cls.supports_gradient_checkpointing:
        raise ConfigError(
            f"model.gradient_checkpointing: {config.model_type} ({cls.__name__}) does not support "
            "gradient checkpointing; set it to false"
        )


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
    for key in (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "intermediate_size",
        "head_dim",
    ):
        value = overrides.get(key)
        nullable = key in ("num_key_value_heads", "head_dim") and value is None
        if key in overrides and not nullable and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{prefix}{key}: expected a positive integer, got {value!r}")

    def value_of(key: str) -> Any:
        return overrides[key] if key in overrides else getattr(config, key, None)

    heads, hidden, kv_heads = value_of("num_attention_heads"), value_of("hidden_size"), value_of("num_key_value_heads")
    changed = set(overrides)
    if (
        isinstance(heads, int)
        and isinstance(hidden, int)
        and {"num_attention_heads", "hidden_size"} & changed
        and hidden % heads
    ):
        name = "num_attention_heads" if "num_attention_heads" in overrides else "hidden_size"
        raise ConfigError(f"{prefix}{name}: num_attention_heads ({heads}) must divide hidden_size ({hidden})")
    if (
        isinstance(heads, int)
        and isinstance(kv_heads, int)
        and {"num_attention_heads", "num_key_value_heads"} & changed
        and heads % kv_heads
    ):
        name = "num_key_value_heads" if "num_key_value_heads" in overrides else "num_attention_heads"
        raise ConfigError(f"{prefix}{name}: num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads})")


def load_tokenizer(settings: ModelSettings, same_vocabulary: bool = True) -> PreTrainedTokenizerBase:
    """The student's tokenizer (the teacher's when the student is built from its config), checked against the
    teacher's: distillation over logits needs the same vocabulary, not just the same size (unless
    ``same_vocabulary`` is False: cross-tokenizer distillation loads the teacher's on its own)."""
    if not settings.student:
        tokenizer = load_pretrained_tokenizer(settings.teacher, "model.teacher")
    else:
        tokenizer = load_pretrained_tokenizer(settings.student, "model.student")
        teacher_tok = (
            load_pretrained_tokenizer(settings.teacher, "model.teacher")
            if settings.teacher and same_vocabulary
            else tokenizer
        )
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


def teacher_dtype(settings: ModelSettings, bf16: bool) -> torch.dtype:
    """``teacher_dtype``; ``auto``: bf16 when training in bf16 or on a GPU that has it, else float32."""
    if settings.teacher_dtype != "auto":
        return DTYPES[settings.teacher_dtype]
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 or gpu_bf16 else torch.float32


def load_teacher(settings: ModelSettings, bf16: bool, task: str = "causal_lm") -> PreTrainedModel:
    dtype = teacher_dtype(settings, bf16)
    teacher = _load(settings.teacher, "model.teacher", task, dtype, settings.attn_implementation)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def load_student(settings: ModelSettings, seed: int, task: str = "causal_lm") -> PreTrainedModel:
    """From its directory, or a fresh model from the teacher's config with ``student_overrides`` applied; with
    ``gradient_checkpointing`` on."""
    if settings.student:
        student = _load(settings.student, "model.student", task, torch.float32, settings.attn_implementation)
    else:
        student = _student_from_teacher_config(settings, seed, task)
    if settings.gradient_checkpointing:
        # Non-reentrant: the reentrant variant gives no gradient to parameters whose layer inputs do not require
        # one, and is what torch deprecates. Both calls also make the embeddings' output require gradients, which
        # peft's LoRA (frozen embeddings) needs. transformers 5.24 renamed the call (the old name warns); the GPU
        # check's 5.17 has only the old one.
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return student


def _student_from_teacher_config(settings: ModelSettings, seed: int, task: str) -> PreTrainedModel:
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
