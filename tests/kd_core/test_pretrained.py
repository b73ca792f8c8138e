"""GGUF files that transformers cannot load are one line naming the file and what is supported (no weight is read).

The real GGUF model (SmolLM2) is exercised by tests/distill/student/test_real_model.py; these files are built here
with the `gguf` package's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kd_core.config import ConfigError
from kd_core.pretrained import check_gguf, load_causal_lm


def write_gguf(path: Path, architecture: str, tensor_type=None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:  # raw bytes of a quantized tensor, one block per row (raw_shape is in bytes, gguf 0.19)
        _, size = gguf.GGML_QUANT_SIZES[tensor_type]
        writer.add_tensor("token_embd.weight", np.zeros((4, size), dtype=np.uint8), raw_shape=(4, size),
                          raw_dtype=tensor_type)
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

    with pytest.raises(ConfigError, match=r"architecture 'madeup' cannot be loaded by transformers; supported: .*llama"):
        check_gguf(write_gguf(tmp_path / "arch.gguf", "madeup"), "model")
    path = write_gguf(tmp_path / "q81.gguf", "llama", gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ConfigError, match=r"quantization type\(s\) Q8_1 cannot be dequantized; supported: .*Q4_1"):
        check_gguf(path, "model")
