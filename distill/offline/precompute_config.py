"""The settings of ``distill precompute`` (:mod:`distill.offline.precompute`): the teacher (a local model or a served
one), the store's encoding and the data, validated up front."""

from __future__ import annotations

import dataclasses
from typing import Literal

from distill.data.datasets import DataSettings
from distill.losses.kinds import CHUNK_SIZE
from distill.offline import served
from kd_core.config import option, section
from kd_core.served_limits import ServedLimits

DEVICE_MAPS = ("", "auto", "balanced", "balanced_low_0", "sequential")


@dataclasses.dataclass
class PrecomputeConfig:
    teacher: str = option(
        "", help="Teacher model directory (anything AutoModelForCausalLM.from_pretrained loads) or .gguf file."
    )
    teacher_url: str = option(
        "",
        help="Instead of `teacher`: an OpenAI-compatible server's base URL (vLLM: http://HOST:8000/v1); its prompt "
        "log-probabilities of each row's own token ids fill the store (temperature 1).",
    )
    teacher_model: str = option("", help="With teacher_url: the model name the server serves.")
    teacher_api_key_env: str | None = option(
        None, help="With teacher_url: NAME of the environment variable holding the API key; null = no auth."
    )
    output_dir: str = option("", help="New (or empty) directory for the store.")
    k: int = option(64, help="Token ids (and log-probabilities) kept per counted token.")
    temperature: float = option(1.0, help="Softmax temperature of the stored log-probabilities (= loss.temperature).")
    value_bits: int = option(8, help="Bits per stored log-probability (2..16): 8 keeps them within 0.03 nats.")
    value_range: float = option(16.0, help="Log-probabilities below -value_range are stored as -value_range.")
    batch_size: int = option(8, help="Sequences per teacher forward.")
    chunk_size: int = option(CHUNK_SIZE, help="Tokens per chunk when projecting hidden states to logits.")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto",
        help="Teacher weights dtype; `auto` = bfloat16 on a CUDA GPU that supports it, else float32 (bf16 "
        "matmuls are slow on most CPUs).",
    )
    teacher_device_map: str = option(
        "",
        help="Shard one teacher over this process's devices: `auto`, `balanced`, `balanced_low_0` or "
        "`sequential` (transformers' device_map); empty = the whole teacher on this process's device.",
    )
    teacher_max_memory: dict[str, str] = option(
        {}, help="With teacher_device_map: memory per device, e.g. {0: 70GiB, 1: 70GiB, cpu: 200GiB}."
    )
    teacher_offload_dir: str = option(
        "", help="With teacher_device_map: directory for the weights that fit on no device (slow; disk offload)."
    )
    attn_implementation: Literal["sdpa", "eager"] = option("sdpa", help="Teacher attention kernel.")
    seed: int = option(42, help="The training seed: it picks the held-out split, so it must match `distill train`.")
    segment_samples: int = option(
        1024, help="Examples per committed segment: a killed run loses at most one segment per process."
    )
    overwrite: bool = option(
        False,
        help="Start again in an unfinished store made with other settings (its segments are removed); "
        "without it such a store is refused. An unfinished store with the same settings is always resumed.",
    )
    student_tokenizer: str = option(
        "",
        help="The student's model or tokenizer directory (or .gguf). With teacher_url (required there): the data is "
        "tokenized by it and the server's tokenizer must be the same. With a local teacher, across tokenizers "
        "(loss.cross_tokenizer): the store keeps the teacher's top-k in the teacher's own vocabulary at the teacher "
        "positions aligned with the student's counted ones; empty = the teacher's tokenizer.",
    )
    served: ServedLimits = section(
        ServedLimits, help="With teacher_url: calls in flight, rate limits, retries, prices and the budget."
    )
    data: DataSettings = section(DataSettings, help="Training data, exactly as `distill train` will read it.")

    def __post_init__(self) -> None:
        if not self.teacher and not self.teacher_url:
            raise ValueError("teacher: a teacher model directory (or teacher_url, a served teacher) is required")
        if self.teacher_url:
            served.check_config(self)
        if not self.output_dir:
            raise ValueError("output_dir: a directory for the store is required")
        if not self.data.train_file:
            raise ValueError("data.train_file: a training dataset is required")
        if self.k < 1:
            raise ValueError(f"k: expected >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if not 2 <= self.value_bits <= 16:
            raise ValueError(f"value_bits: expected 2..16, got {self.value_bits}")
        if self.value_range <= 0:
            raise ValueError(f"value_range: expected > 0, got {self.value_range}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_size and chunk_size must be >= 1")
        if self.segment_samples < 1:
            raise ValueError(f"segment_samples: expected >= 1, got {self.segment_samples}")
        if self.teacher_device_map not in DEVICE_MAPS:
            raise ValueError(
                f"teacher_device_map: expected one of {', '.join(map(repr, DEVICE_MAPS))}, got "
                f"{self.teacher_device_map!r}"
            )
        if (self.teacher_max_memory or self.teacher_offload_dir) and not self.teacher_device_map:
            raise ValueError("teacher_device_map: teacher_max_memory and teacher_offload_dir need a device map (auto)")
