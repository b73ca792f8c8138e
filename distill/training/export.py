"""``distill export``: a Hugging Face model directory of the student from a training checkpoint, offline.

Works for checkpoints of every launch mode, in one process, without GPUs or a process group:

* DeepSpeed (ZeRO-2 and ZeRO-3): the per-rank shards under ``pytorch_model/`` are consolidated to fp32 with
  DeepSpeed's own ``zero_to_fp32`` utilities;
* single process and DDP: accelerate's ``model.safetensors``.

Either way this is the state of the whole prepared module (``student.*`` plus trainable loss parameters such as
feature projectors, ``features.*``); only the student is exported. The checkpoint carries the student's config and
tokenizer (``student/``), so the original model directories are not needed. A LoRA run exports like the trainer does
at the end of training: the adapter in ``<output_dir>/adapter`` and/or the merged model in ``<output_dir>``
(``lora_export`` in the run's config). The end of training writes the same files to ``<run>/final``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from distill.runtime import inner
from distill.training import checkpoint as ckpt
from kd_core import ownership
from kd_core.atomic import atomic_directory
from kd_core.commands import EXIT_OK
from kd_core.config import ConfigError, option, parse_command_line

logger = logging.getLogger("distill")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STUDENT_PREFIX = "student."


@dataclasses.dataclass
class ExportConfig:
    checkpoint: str = option("", help="A checkpoint directory (`<output_dir>/checkpoint-N`) of `distill train`.")
    output_dir: str = option("", help="Where to write the model directory; must not exist or be empty.")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", help="dtype of the saved weights (training keeps fp32 master weights)."
    )

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint: a checkpoint directory is required")
        if not self.output_dir:
            raise ValueError("output_dir: an output directory is required")


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state of the prepared module saved in ``checkpoint`` (all ranks' shards joined)."""
    if (checkpoint / "pytorch_model").is_dir():  # accelerate 1.15 saves DeepSpeed engines under this tag
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    if (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(checkpoint / "model.safetensors"))
    raise ConfigError(f"checkpoint: {checkpoint} holds neither DeepSpeed shards (pytorch_model/) nor model.safetensors")


def student_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's weights, without the wrapper prefix; projectors and other loss parameters stay behind."""
    return {k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def load_student_from_checkpoint(checkpoint: Path, run_config: dict[str, Any]) -> torch.nn.Module:
    """The student architecture from ``checkpoint/student`` (wrapped with LoRA when the run used it), loaded with the
    consolidated weights; every weight must be accounted for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint / ckpt.STUDENT_DIR)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = run_config.get("lora") or {}
    if lora.get("enabled"):
        from distill.student.lora import LoraSettings, apply_lora

        student = apply_lora(student, LoraSettings(**lora))
    weights = student_state(consolidated_state_dict(checkpoint))
    missing, unexpected = student.load_state_dict(weights, strict=False)
    # A tied LM head is one tensor under two names; checkpoints may hold it under either.
    tied = {name for name in missing if name.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"checkpoint: {checkpoint} does not match the student's architecture "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return student


def export_checkpoint(checkpoint: Path, output_dir: Path, dtype: str = "float32") -> Path:
    """Writes the student of ``checkpoint`` as a model directory loadable with ``from_pretrained``, with the
    tokenizer. The files are written to a temporary sibling and renamed into place when complete (``distill
    export`` holds the lock beside it meanwhile; a training run's ``final/`` is under the run's own lock)."""
    from transformers import AutoTokenizer

    problem = ckpt.validate(checkpoint) if checkpoint.is_dir() else "not a directory"
    if problem:
        raise ConfigError(f"checkpoint: cannot use {checkpoint}: {problem}")
    if not (checkpoint / ckpt.STUDENT_DIR / "config.json").is_file():
        raise ConfigError(f"checkpoint: {checkpoint} has no {ckpt.STUDENT_DIR}/config.json (saved by an older version)")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConfigError(f"output_dir: {output_dir} exists and is not empty; choose another directory")
    run_config = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / ckpt.STUDENT_DIR)
    student = load_student_from_checkpoint(checkpoint, run_config).to(DTYPES[dtype])

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(output_dir) as tmp:
        if (run_config.get("lora") or {}).get("enabled"):
            from distill.student.lora import export_lora

            mode = run_config.get("lora_export", "merged")
            if mode in ("adapter", "both"):  # before merging: merge_and_unload changes the model in place
                export_lora(student, tmp / "adapter", merged=False)
                tokenizer.save_pretrained(tmp / "adapter")
            if mode in ("merged", "both"):
                export_lora(student, tmp / "merged", merged=True, tokenizer=tokenizer)
                for path in (tmp / "merged").iterdir():  # export_lora refuses a non-empty directory: move it up
                    os.replace(path, tmp / path.name)
                (tmp / "merged").rmdir()
        else:
            student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        ownership.claim(tmp, OUTPUT.command, {"checkpoint": str(checkpoint)}, finished=True)
        if output_dir.exists():
            output_dir.rmdir()  # empty (checked above)
    return output_dir


# An exported model is the whole directory, written to a temporary sibling and renamed into place when complete.
OUTPUT = ownership.OutputKind("distill export", ("*",), published=True)


def export_run(
    accelerator, prepared: torch.nn.Module, tokenizer, lora: bool, last_checkpoint: Path, directory: Path
) -> None:
    """The end of a training run: a Hugging Face model directory of the student alone (gathered from ZeRO-3
    shards), with the tokenizer. With LoRA: the merged model and/or the adapter (``final/adapter``), as the run's
    ``lora_export`` says, through ``last_checkpoint``. Every rank calls it."""
    if lora:
        # Through the final checkpoint, whose consolidation also gathers ZeRO-3-sharded adapters: one code path
        # for every launch mode. The merge re-applies the frozen base weights' zeros (never densifies).
        if accelerator.is_main_process:
            export_checkpoint(last_checkpoint, directory)
        accelerator.wait_for_everyone()
        return
    state = accelerator.get_state_dict(prepared)  # collective under ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        inner(prepared).student.save_pretrained(directory, state_dict=student_state(state))
        tokenizer.save_pretrained(directory)
    accelerator.wait_for_everyone()


Config = ExportConfig


def run(cfg: ExportConfig) -> Path:
    """Exports the checkpoint's student; returns the model directory (locked while it is written)."""
    with ownership.prepare(
        cfg.output_dir,
        OUTPUT,
        {"checkpoint": cfg.checkpoint},
        resume=False,
        overwrite=False,
        remedy="choose another directory",
    ) as output:
        out = export_checkpoint(Path(cfg.checkpoint), output.path, cfg.dtype)
    logger.info("exported %s to %s", cfg.checkpoint, out)
    return out


def main(argv: list[str]) -> int:
    cfg = parse_command_line(ExportConfig, argv, "distill export", __doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(cfg)
    return EXIT_OK
