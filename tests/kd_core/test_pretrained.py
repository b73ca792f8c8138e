"""GGUF files that transformers cannot load are one line naming the file and what is supported (no weight is read).

The real GGUF model (SmolLM2) is exercised by tests/distill/student/test_real_model.py; these files are built here
with the `gguf` package's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kd_core.config import ConfigError
from kd_core.pretrained import check_gguf, load_causal_lm, load_tokenizer
from tests.conftest import write_llama_gguf


def write_gguf(path: Path, architecture: str, tensor_type=None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:  # raw bytes of a quantized tensor, one block per row (raw_shape is in bytes, gguf 0.19)
        _, size = gguf.GGML_QUANT_SIZES[tensor_type]
        writer.add_tensor(
            "token_embd.weight", np.zeros((4, size), dtype=np.uint8), raw_shape=(4, size), raw_dtype=tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_not_gguf_truncated_and_missing_files(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    with pytest.raises(ConfigError, match=r"model.teacher: .*model.gguf is not a GGUF file"):
        check_gguf(text, "model.teacher")
    whole = write_gguf(tmp_path / "whole.gguf", "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-60])
    with pytest.raises(ConfigError, match=r"model.teacher: .*cut.gguf is truncated or corrupt"):
        check_gguf(cut, "model.teacher")
    with pytest.raises(ConfigError, match=r"GGUF file not found"):
        load_causal_lm(tmp_path / "absent.gguf", "model.teacher")


def test_unsupported_architecture_and_quantization_type_name_what_is_supported(tmp_path):
    import gguf

    with pytest.raises(
        ConfigError,
        match=r"architecture 'madeup' cannot be loaded by transformers as a causal LM; "
        r"supported: .*llama",
    ):
        check_gguf(write_gguf(tmp_path / "arch.gguf", "madeup"), "model")
    path = write_gguf(tmp_path / "q81.gguf", "llama", gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ConfigError, match=r"quantization type\(s\) Q8_1 cannot be dequantized; supported: .*Q4_1"):
        check_gguf(path, "model")


def test_a_file_without_tensors_or_with_a_metadata_architecture_is_refused_before_loading(tmp_path, tokenizer):
    """A header and tokenizer with no weights used to load as a randomly initialised model (library warnings only);
    `general` and `tokenizer` are keys of transformers' GGUF table, not architectures, and ended in a traceback."""
    from distill.student.tiny import tiny_llama

    model = tiny_llama(len(tokenizer), hidden_size=32, num_layers=2)
    empty = write_llama_gguf(tmp_path / "empty.gguf", model, tokenizer, tensors=False)
    with pytest.raises(
        ConfigError,
        match=r"^model\.teacher: .*empty\.gguf holds 0 tensor\(s\) but its llama "
        r"architecture with 2 block\(s\) needs token_embd\.weight, blk\.0\.\*, "
        r"blk\.1\.\*; expected a complete model file",
    ):
        load_causal_lm(empty, "model.teacher")
    with pytest.raises(ConfigError, match="holds 0 tensor"):
        load_tokenizer(empty, "model.teacher")  # the tokenizer alone is there, but nothing would train on it
    for name in ("general", "tokenizer", "t5"):
        path = write_llama_gguf(tmp_path / f"{name}.gguf", model, tokenizer, architecture=name)
        with pytest.raises(
            ConfigError,
            match=rf"architecture '{name}' cannot be loaded by transformers as a causal "
            r"LM; supported: .*llama",
        ):
            check_gguf(path, "model")
    folder = tmp_path / "x.gguf"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"^model: .*x\.gguf is a directory; expected a GGUF file"):
        check_gguf(folder, "model")


def test_a_whole_tiny_gguf_loads_to_the_logits_of_the_model_it_was_written_from(tmp_path, tokenizer):
    import torch

    from distill.student.tiny import tiny_llama

    model = tiny_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=3).eval()
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    loaded = load_causal_lm(path, "model")
    ids = torch.tensor([tokenizer("What is 12 plus 7?").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert load_tokenizer(path, "model")("What is 12 plus 7?").input_ids == ids[0].tolist()


def test_a_gguf_tokenizer_and_config_are_converted_once_per_file_version(tmp_path, tokenizer, monkeypatch):
    """Gemma-3's tokenizer takes about 25 s to convert: each file's is converted once and read back from the cache
    folder; a changed file (new modification time) gets a new entry."""
    import os

    import kd_core.pretrained as pretrained
    from distill.student.tiny import tiny_llama

    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    conversions = []
    for name in ("_convert_tokenizer", "_convert_config"):
        original = getattr(pretrained, name)
        monkeypatch.setattr(pretrained, name, lambda p, out, f=original, n=name: conversions.append(n) or f(p, out))
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(len(tokenizer), hidden_size=32), tokenizer)
    text = "What is 12 plus 7?"
    first = load_tokenizer(path, "model")(text).input_ids
    assert load_tokenizer(path, "model")(text).input_ids == first
    assert pretrained.load_config(path).model_type == pretrained.load_config(path).model_type == "llama"
    assert sorted(conversions) == ["_convert_config", "_convert_tokenizer"]
    entry = pretrained.gguf_cache_entry(path)
    assert entry.parent == tmp_path / "cache" and sorted(p.name for p in entry.iterdir()) == ["config", "tokenizer"]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert pretrained.gguf_cache_entry(path) != entry
    assert load_tokenizer(path, "model")(text).input_ids == first
    assert conversions.count("_convert_tokenizer") == 2
    assert not list((tmp_path / "cache").glob("*/.*.tmp"))  # no temporary folder left behind


def test_an_unwritable_gguf_cache_is_one_line_naming_the_variable(tmp_path, tokenizer, monkeypatch):
    from distill.student.tiny import tiny_llama

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("DISTILL_GGUF_CACHE", str(blocked / "cache"))
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(len(tokenizer), hidden_size=32), tokenizer)
    with pytest.raises(ConfigError, match=r"^model\.teacher: cannot write the GGUF cache under .*; set DISTILL_GGUF"):
        load_tokenizer(path, "model.teacher")
