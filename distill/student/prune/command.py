"""``distill prune``: structured pruning into a smaller Hugging Face model, or sparsity masks on a dense one.

    distill prune --model TEACHER --output-dir OUT --depth.num_layers 12 --calibration.data data.jsonl
    distill prune --config configs/prune/llama_minitron.yaml --model TEACHER --output-dir OUT --calibration.data D

Every check (model family, reachable targets, calibration data) runs before anything is written; the output is
assembled in a temporary sibling directory and renamed into place, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.student.models import DTYPES, require_model_dir
from distill.student.prune.calibration import Calibration, load_calibration
from distill.student.prune.families import Family, family_for
from distill.student.prune.importance import Importance, cached_importance
from distill.student.prune.report import (
    count_params,
    format_table,
    layer_rows,
    shape_summary,
    tensor_list,
    write_report,
    zero_fraction,
)
from distill.student.prune.structured import (
    Targets,
    build_pruned_model,
    check_target_config,
    plan_pruning,
    validate_targets,
)
from distill.student.prune.unstructured import parse_pattern, sparsify
from kd_core import ownership
from kd_core.atomic import atomic_directory
from kd_core.commands import EXIT_OK
from kd_core.config import ConfigError, option, parse_command_line, save_config, section
from kd_core.pretrained import is_gguf, load_causal_lm, load_config, load_tokenizer


@dataclass
class CalibrationSettings:
    data: str | None = option(None, help="jsonl with 'messages', 'prompt'/'completion' or 'text' per line")
    num_samples: int = option(64, help="number of lines used (the first usable ones)")
    max_length: int = option(256, help="tokens per sample; longer samples are truncated")
    min_tokens: int = option(32, help="refuse calibration sets with fewer real tokens than this")
    batch_size: int = option(4, help="samples per forward pass")

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer")


@dataclass
class DepthSettings:
    num_layers: int | None = option(None, help="layers to keep (block_influence or uniform)")
    method: Literal["block_influence", "uniform", "explicit"] = option(
        "block_influence",
        help="block_influence: drop the layers with the lowest 1 - cos(in, out); uniform: keep "
        "evenly spaced layers; explicit: drop depth.drop_layers",
    )
    drop_layers: list[int] = option([], help="teacher layer indices to drop (method explicit)")


@dataclass
class WidthSettings:
    num_attention_heads: int | None = option(None, help="query heads to keep; whole KV groups are removed")
    intermediate_size: int | None = option(None, help="MLP channels to keep in every layer")
    hidden_size: int | None = option(None, help="hidden (embedding) channels to keep")
    criterion: Literal["activation", "magnitude"] = option(
        "activation", help="activation: Minitron mean |activation| on calibration data; magnitude: weight L2 norm"
    )


@dataclass
class SparsitySettings:
    method: Literal["none", "wanda", "magnitude"] = option("none", help="mask weights instead of removing structures")
    ratio: float | None = option(None, help="unstructured: fraction of each target weight set to zero")
    pattern: str | None = option(None, help="semi-structured 'N:M': keep N of every M consecutive input weights")

    def __post_init__(self) -> None:
        if self.method == "none":
            if self.ratio is not None or self.pattern is not None:
                raise ValueError("method: set 'wanda' or 'magnitude' to use sparsity.ratio/pattern")
            return
        if (self.ratio is None) == (self.pattern is None):
            raise ValueError("ratio: give exactly one of sparsity.ratio and sparsity.pattern")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio: expected a fraction strictly between 0 and 1, got {self.ratio}")
        if self.pattern is not None:
            parse_pattern(self.pattern)


@dataclass
class PruneConfig:
    model: str = option("", help="teacher model directory (Hugging Face format) or .gguf file (dequantized)")
    output_dir: str = option("", help="new directory for the pruned model; must not exist yet (or be empty)")
    calibration: CalibrationSettings = section(CalibrationSettings, help="calibration data")
    depth: DepthSettings = section(DepthSettings, help="layer removal")
    width: WidthSettings = section(WidthSettings, help="head / MLP / hidden channel removal")
    sparsity: SparsitySettings = section(SparsitySettings, help="unstructured or N:M masks (dense output)")
    cache_dir: str | None = option(None, help="importance cache; default $XDG_CACHE_HOME/distill/prune")
    device: str = option("cpu", help="device for the calibration pass only (e.g. cuda); pruning runs on cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto",
        help="dtype the model is loaded, run and saved in (importance statistics are always float32); "
        "auto = the checkpoint's own (float32 when it does not say)",
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: expected a model directory (--model DIR)")
        if not self.output_dir:
            raise ValueError("output_dir: expected a new directory (--output-dir DIR)")


def _targets(cfg: PruneConfig) -> Targets:
    return Targets(
        num_layers=cfg.depth.num_layers,
        depth_method=cfg.depth.method,
        drop_layers=list(cfg.depth.drop_layers),
        num_attention_heads=cfg.width.num_attention_heads,
        intermediate_size=cfg.width.intermediate_size,
        hidden_size=cfg.width.hidden_size,
        criterion=cfg.width.criterion,
    )


def _cache_dir(cfg: PruneConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distill" / "prune"


def _report(
    cfg: PruneConfig,
    family: Family,
    teacher_config: PretrainedConfig,
    teacher_params: int,
    student: PreTrainedModel,
    kept: list[int],
    per_weight: dict[str, float],
    calibration: Calibration | None,
    importance: Importance | None,
    cache: dict[str, Any] | None,
) -> dict[str, Any]:
    """The content of ``prune_report.json`` (documented in docs/pruning.md)."""
    sparse = cfg.sparsity.method != "none"
    return {
        "teacher": cfg.model,
        "mode": "sparsity" if sparse else "structured",
        "params_before": teacher_params,
        "params_after": count_params(student),
        "config_before": shape_summary(teacher_config, family),
        "config_after": shape_summary(student.config, family),
        "kept_layers": kept,
        "criterion": cfg.sparsity.method if sparse else cfg.width.criterion,
        "depth_method": None if sparse else cfg.depth.method,
        "sparsity": zero_fraction(student),
        "sparsity_per_weight": per_weight,
        "sparsity_pattern": cfg.sparsity.pattern,
        "calibration": None
        if calibration is None
        else {
            "data": calibration.source,
            "num_samples": calibration.num_samples,
            "num_tokens": calibration.num_tokens,
            "max_length": cfg.calibration.max_length,
        },
        "block_influence": tensor_list(importance.block_influence) if importance is not None else None,
        "importance_cache": cache,
        "layers": layer_rows(student, family, kept),
    }


def _write_output(
    tmp: Path, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: PruneConfig, report: dict[str, Any]
) -> None:
    """Model (safetensors via save_pretrained; never pickle), tokenizer, resolved config and report into ``tmp``."""
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_config(cfg, tmp / "prune_config.yaml")
    write_report(tmp / "prune_report.json", report)


# A pruned model is the whole directory, written to a temporary sibling and renamed into place when complete.
OUTPUT = ownership.OutputKind(
    "distill prune",
    ("*",),
    legacy=lambda d: (d / "prune_report.json").is_file(),
    done="prune_report.json",
    published=True,
)

Config = PruneConfig


def run(cfg: PruneConfig) -> dict[str, Any]:
    """Writes the pruned (or sparsified) model, its tokenizer, ``prune_config.yaml`` and ``prune_report.json`` into
    ``cfg.output_dir``; returns the report."""
    require_model_dir(Path(cfg.model), "model")
    with ownership.prepare(
        cfg.output_dir,
        OUTPUT,
        {"model": cfg.model},
        resume=False,
        overwrite=False,
        remedy="refusing to overwrite it; choose another output_dir",
    ) as output:
        return _prune(cfg, output)


def _load_model(cfg: PruneConfig, config) -> torch.nn.Module:
    """One copy, in the checkpoint's dtype (transformers 5.23 resolves its "dtype" to a torch.dtype, None if unsaid):
    statistics are float32 per layer (importance.py); the student is sliced from these weights, not a float32 copy."""
    dtype = DTYPES.get(cfg.dtype) or config.dtype or torch.float32
    if is_gguf(cfg.model):
        return load_causal_lm(cfg.model, "model", dtype).to(cfg.device).eval()
    model_cls = getattr(transformers, config.architectures[0])  # checked by family_for
    return model_cls.from_pretrained(cfg.model, dtype=dtype).to(cfg.device).eval()


def _prune(cfg: PruneConfig, output: ownership.Output) -> dict[str, Any]:
    model_dir, out_dir = Path(cfg.model), output.path
    config = load_config(model_dir, "model")
    family = family_for(config)
    targets = _targets(cfg)
    sparse = cfg.sparsity.method != "none"
    if sparse and targets.requested:
        raise ConfigError("sparsity: masks and structured targets in one run are not supported; run prune twice")
    if not sparse and not targets.requested:
        raise ConfigError("nothing to do: set depth.*, width.* or sparsity.method (see --help)")
    if not sparse:
        validate_targets(config, family, targets)
        check_target_config(config, family, targets)
    needs_data = cfg.sparsity.method == "wanda" or (not sparse and targets.needs_calibration)
    tokenizer = load_tokenizer(model_dir, "model")
    calibration = None
    if cfg.calibration.data and not needs_data:
        print("note: calibration.data is not used by these targets (magnitude / uniform / explicit)")
    if needs_data:
        if not cfg.calibration.data:
            raise ConfigError("calibration.data: this criterion needs calibration data (a jsonl file)")
        c = cfg.calibration
        calibration = load_calibration(c.data, tokenizer, c.num_samples, c.max_length, c.min_tokens)

    teacher = _load_model(cfg, config)
    importance, cache = None, None
    if calibration is not None:
        importance, path, hit = cached_importance(
            teacher, family, model_dir, calibration, cfg.calibration.batch_size, _cache_dir(cfg)
        )
        cache = {"path": str(path), "hit": hit}
    # Planning and slicing are cheap and index-heavy; on the CPU every index tensor lives on one device.
    teacher = teacher.to("cpu")
    teacher_params = count_params(teacher)
    if sparse:
        input_norms = importance.input_sq_norms if importance is not None else None
        per_weight = sparsify(
            teacher, family, cfg.sparsity.method, cfg.sparsity.ratio, cfg.sparsity.pattern, input_norms
        )
        student, kept = teacher, list(range(config.num_hidden_layers))
    else:
        plan = plan_pruning(config, family, targets, teacher.state_dict(), importance)
        student, kept, per_weight = build_pruned_model(teacher, family, plan), plan.kept_layers, {}
    student = student.to("cpu")

    with atomic_directory(out_dir) as tmp:  # a failed run leaves nothing behind
        report = _report(cfg, family, config, teacher_params, student, kept, per_weight, calibration, importance, cache)
        _write_output(tmp, student, tokenizer, cfg, report)
        ownership.claim(tmp, OUTPUT.command, {"model": cfg.model}, finished=True)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty (no other writer: the lock beside it is held)
    print(format_table(report))
    print(f"saved pruned model to {out_dir}")
    return report


def main(argv: list[str]) -> int:
    cfg = parse_command_line(PruneConfig, argv, "distill prune", __doc__ or "")
    run(cfg)
    return EXIT_OK
