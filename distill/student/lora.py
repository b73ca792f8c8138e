"""LoRA for students (peft), with merges that never silently densify a sparse model.

    settings = LoraSettings(enabled=True, r=16, train_norms=True)
    model = apply_lora(model, settings)                     # a peft.PeftModel
    ... train ...
    export_lora(model, "out/adapter", merged=False)          # adapter only
    export_lora(model, "out/merged", merged=True, tokenizer=tok)   # merged weights + tokenizer, zeros preserved

Heavily pruned students often need their norms and embeddings retrained: ``train_norms``/``train_embeddings`` add
those modules to peft's ``modules_to_save`` so they train *and* are saved with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.student.sparsity import SparsityMasks
from kd_core.config import option


@dataclass
class LoraSettings:
    """The ``lora`` config section."""

    enabled: bool = option(False, help="train LoRA adapters instead of all weights")
    r: int = option(16, help="LoRA rank")
    alpha: int = option(32, help="LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = option(0.05, help="dropout on the LoRA input")
    target_modules: list[str] = option(["all-linear"], help="module name suffixes to adapt, or ['all-linear']")
    modules_to_save: list[str] = option([], help="modules trained in full and saved with the adapter")
    train_norms: bool = option(False, help="also train every norm layer in full (saved with the adapter)")
    train_embeddings: bool = option(False, help="also train the input embeddings (and an untied LM head) in full")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: expected a positive rank, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha: expected a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected 0 <= dropout < 1, got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules: expected at least one module name or 'all-linear'")


def _is_norm(module: nn.Module) -> bool:
    # transformers' RMSNorm classes are per-model (LlamaRMSNorm, Qwen2RMSNorm, ...) and share no base class.
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def full_training_modules(model: PreTrainedModel, settings: LoraSettings) -> list[str]:
    """Module names trained in full: ``modules_to_save`` plus the norms/embeddings the settings ask for."""
    names = list(settings.modules_to_save)
    if settings.train_norms:
        names += [name for name, module in model.named_modules() if name and _is_norm(module)]
    if settings.train_embeddings:
        modules = {id(m): n for n, m in model.named_modules()}
        names.append(modules[id(model.get_input_embeddings())])
        output = model.get_output_embeddings()
        # A tied LM head is the embedding itself; wrapping it twice would untie it.
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            names.append(modules[id(output)])
    return names


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wraps ``model`` with LoRA adapters; only adapters and the full-training modules require grad."""
    targets = settings.target_modules
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        modules_to_save=full_training_modules(model, settings) or None,
        task_type=TaskType.CAUSAL_LM if model.can_generate() else TaskType.FEATURE_EXTRACTION,
    )
    return get_peft_model(model, config)


def merge_lora(model: PeftModel, masks: SparsityMasks | None = None, reapply_masks: bool = True) -> PreTrainedModel:
    """Merges the adapters into the base weights and returns the plain model, keeping sparse weights sparse.

    ``masks`` default to the zeros of the base weights as they are now. A LoRA update ``B @ A`` is dense, so merging
    fills every zero; the masks are therefore re-applied after the merge. With ``reapply_masks=False`` a sparse
    model is refused (ValueError) instead of being densified silently; a dense model merges as usual.
    """
    masks = masks if masks is not None else SparsityMasks.capture(model)
    if len(masks) and not reapply_masks:
        raise ValueError(
            f"merge_lora: {len(masks)} weight matrices are sparse ({masks.num_masked():,} zeros); merging without "
            "re-applying their masks would densify them. Pass reapply_masks=True or export the adapter unmerged."
        )
    merged = model.merge_and_unload()
    masks.apply(merged)
    return merged


def export_lora(
    model: PeftModel,
    out_dir: str | Path,
    merged: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
    masks: SparsityMasks | None = None,
) -> Path:
    """Writes the adapter alone (``merged=False``) or the merged model plus tokenizer (``merged=True``).

    Merging modifies ``model`` in place (peft's ``merge_and_unload``); export the adapter first if both are wanted.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export_lora: {out} is not empty; refusing to overwrite it")
    if not merged:
        model.save_pretrained(out)
        return out
    if tokenizer is None:
        raise ValueError("export_lora: a merged export needs the tokenizer, so the directory loads on its own")
    merge_lora(model, masks).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
