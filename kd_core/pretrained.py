"""Pretrained models from a Hugging Face directory or from a single GGUF file, as plain transformers models.

A ``.gguf`` path goes wherever a model directory goes. transformers (5.24, ``modeling_gguf_pytorch_utils``) reads
the file's config, tokenizer and chat template and dequantizes the weights, but marks the model as quantized and
refuses ``save_pretrained`` on it; :func:`load_causal_lm` rebuilds it as an ordinary model of the same class with
the same weights, so pruning, training, saving and export treat it like any other. Files transformers cannot read
(not GGUF, truncated, an architecture or quantization type it cannot dequantize) are a :class:`ConfigError` naming
the file and what is supported, raised before any weight is read.

Reading a GGUF header is slow for a large vocabulary (Gemma-3's 262,144 tokens: about 10 s to check the file, 10 s
more for its config, 25 s to convert its tokenizer on 2 busy cores), and every command reads a model's config and
tokenizer several times. So the config and the tokenizer of each file are converted once and saved, as ordinary
Hugging Face files, in a cache directory (:func:`gguf_cache_root`: ``$DISTILL_GGUF_CACHE``, else
``$XDG_CACHE_HOME/distill/gguf``, else ``~/.cache/distill/gguf``), under a key of the file's resolved path, size and
modification time and the transformers version that converted it: a file replaced or touched, or a transformers
upgrade, gets a new entry. An entry exists only for a file that passed :func:`check_gguf`. The weights are not
cached (a float32 copy is 4x the file): each process dequantizes them once, in :func:`load_causal_lm`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kd_core.atomic import publish_directory
from kd_core.config import ConfigError

GGUF_MAGIC = b"GGUF"
CACHE_ENV = "DISTILL_GGUF_CACHE"


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


# GGUF architecture names that transformers (5.24, ``load_gguf_checkpoint``) renames before looking them up.
_GGUF_ARCHITECTURE_NAMES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}
# Keys of transformers' GGUF table that are not model architectures (``general``, ``tokenizer``: metadata sections a
# file can name by mistake) or are not causal LMs (T5 loads as an encoder-decoder, which nothing here trains).
_NOT_CAUSAL_LMS = frozenset({"general", "tokenizer", "t5", "t5encoder", "umt5"})


def check_gguf(path: str | Path, field: str) -> None:
    """The file exists, is GGUF, parses to the end, names a causal-LM architecture transformers reads, carries that
    architecture's tensors (the embedding and every block the header counts) in types transformers can dequantize;
    otherwise one ConfigError naming ``field``, the file and what was expected. Reads the header only (mmap)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{field}: {path} is a directory; expected a GGUF file (or a model directory whose name "
            "does not end in .gguf)"
        )
    if not path.is_file():
        raise ConfigError(f"{field}: GGUF file not found: {path}")
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ConfigError(f"{field}: {path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError(f"{field}: reading {path} needs the 'gguf' package (pip install gguf)") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # numpy raises ValueError/IndexError/struct errors on a cut-off file
        raise ConfigError(f"{field}: {path} is truncated or corrupt ({type(err).__name__}: {err})") from None
    architecture = _check_architecture(reader, path, field)
    _check_tensors(reader, architecture, path, field)


def _field_value(reader, key: str):
    """A scalar or string field of the header, or None when absent."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    return str(bytes(value), "utf-8") if field.types[0] == GGUFValueType.STRING else value[0].item()


def _check_architecture(reader, path: Path, field: str) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_CAUSAL_LMS)
    architecture = _field_value(reader, "general.architecture")
    if architecture is None:
        raise ConfigError(
            f"{field}: {path} names no architecture (no general.architecture); expected one of {', '.join(supported)}"
        )
    if _GGUF_ARCHITECTURE_NAMES.get(architecture, architecture) not in supported:
        raise ConfigError(
            f"{field}: {path}: architecture '{architecture}' cannot be loaded by transformers as a "
            f"causal LM; supported: {', '.join(supported)}"
        )
    return architecture


def _check_tensors(reader, architecture: str, path: Path, field: str) -> None:
    """Without this, transformers loads a file whose tensors are missing as a randomly initialised model and says so
    only in a warning; every block the header counts must have tensors, and the token embedding must be there."""
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import _type_traits  # the types gguf can dequantize (gguf 0.19); F32/F16/BF16 are direct

    names = {t.name for t in reader.tensors}
    blocks = _field_value(reader, f"{architecture}.block_count")
    missing = [] if "token_embd.weight" in names else ["token_embd.weight"]
    if not isinstance(blocks, int) or blocks < 1:
        raise ConfigError(f"{field}: {path}: no {architecture}.block_count in its header; expected a model file")
    present = {name.split(".")[1] for name in names if name.startswith("blk.")}
    missing += [f"blk.{i}.*" for i in range(blocks) if str(i) not in present]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ConfigError(
            f"{field}: {path} holds {len(names)} tensor(s) but its {architecture} architecture with "
            f"{blocks} block(s) needs {shown}; expected a complete model file, not a tokenizer or "
            "metadata-only GGUF"
        )
    readable = {Q.F32, Q.F16, Q.BF16, *_type_traits}
    unsupported = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in readable})
    if unsupported:
        raise ConfigError(
            f"{field}: {path}: quantization type(s) {', '.join(unsupported)} cannot be dequantized; "
            f"supported: {', '.join(sorted(q.name for q in readable))}"
        )


def load_config(path: str | Path, field: str = "model"):
    """The model config of a directory or a GGUF file (for a GGUF file: without its quantization marker, since what
    this module loads is a plain model; converted once, then read from the cache)."""
    from transformers import AutoConfig

    if not is_gguf(path):
        return AutoConfig.from_pretrained(str(path))
    return AutoConfig.from_pretrained(str(_cached(path, field, "config", _convert_config)))


def _convert_config(path: Path, out: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _name_architecture(config)
    config.save_pretrained(out)


def gguf_cache_root() -> Path:
    """Where converted GGUF configs and tokenizers are kept (see the module's docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distill" / "gguf"


def gguf_cache_entry(path: str | Path) -> Path:
    """The cache folder of one GGUF file as it is now (path, size, modification time, transformers version)."""
    import transformers

    path = Path(path).resolve()
    stat = path.stat()
    identity = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0transformers {transformers.__version__}"
    return gguf_cache_root() / f"{path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _cached(path: str | Path, field: str, part: str, convert) -> Path:
    """The folder ``part`` of the file's cache entry, made by ``convert(path, folder)`` after :func:`check_gguf`
    when absent. Two processes may convert at once (the ranks of one job): each fills a temporary folder and the
    first to publish wins; the other's copy is dropped."""
    path = Path(path)
    if not path.is_file():
        check_gguf(path, field)  # the one-line error for a missing file or a directory
    final = gguf_cache_entry(path) / part
    if final.is_dir():  # published whole or not at all
        return final
    check_gguf(path, field)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{part}.", suffix=".tmp", dir=final.parent))
    except OSError as err:
        raise ConfigError(
            f"{field}: cannot write the GGUF cache under {final.parent} ({err}); set {CACHE_ENV}"
        ) from None
    try:
        convert(path, tmp)
        publish_directory(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _name_architecture(config) -> None:
    """A config read from GGUF has no ``architectures`` (transformers 5.24); saved models and pruning need it."""
    if not config.architectures:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]


def load_tokenizer(path: str | Path, field: str = "model"):
    """The tokenizer of a model directory or a GGUF file (with the file's chat template and special tokens;
    converted once, then read from the cache)."""
    from transformers import AutoTokenizer

    if is_gguf(path):
        return AutoTokenizer.from_pretrained(str(_cached(path, field, "tokenizer", _convert_tokenizer)))
    return AutoTokenizer.from_pretrained(str(path))


def _convert_tokenizer(path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)


def load_causal_lm(path: str | Path, field: str = "model", dtype: Any = None, **kwargs: Any):
    """A causal LM from a directory (``from_pretrained``) or a GGUF file (dequantized, then rebuilt as a plain model
    of the same class so that it saves and trains like one)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not is_gguf(path):
        if dtype is not None:  # unset keeps from_pretrained's own default
            kwargs["dtype"] = dtype
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    load_config(path, field)  # checks the file once (a cached config: it was checked when converted)
    path = Path(path)
    dtype = dtype if dtype not in (None, "auto") else torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are already dequantized
    _name_architecture(config)
    plain = type(loaded)(config).to(dtype)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied heads appear in one state dict and not the other; anything else is a real mismatch.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or set(unexpected) - tied:
        raise ConfigError(
            f"{field}: {path}: dequantized weights do not match {type(loaded).__name__} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    return plain.eval()
