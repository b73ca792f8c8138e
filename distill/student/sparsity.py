"""Keep a sparse model sparse while it trains: capture where its weights are zero, re-zero them after each step.

    masks = SparsityMasks.capture(model)          # before or after wrapping with peft (adapter weights skipped)
    handle = masks.attach(optimizer, model)       # re-applies after every optimizer.step()
    ...
    masks.apply(model)                            # or call it yourself (e.g. after merging LoRA)

Masks are keyed by the parameter name *without* peft's wrapper parts (``base_model.model.``, ``.base_layer``,
``.modules_to_save.<adapter>``, ``.original_module``), so masks captured on a plain model apply to its peft-wrapped
version and vice versa. Under DeepSpeed ZeRO-3 parameters are partitioned across ranks; masks are not supported
there (use ZeRO-2 or plain DDP for sparse students).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

_PEFT_PARTS = re.compile(r"\.base_layer|\.modules_to_save\.[^.]+|\.original_module")
# Adapter weights (lora_A/lora_B/...) are not model weights: LoRA B starts as all zeros, and masking it would stop
# the adapter from ever learning.
_ADAPTER_PARAM = re.compile(r"\.lora_")


def canonical_name(name: str) -> str:
    """A parameter name as the unwrapped model spells it."""
    return _PEFT_PARTS.sub("", name.removeprefix("base_model.model."))


@dataclass
class SparsityMasks:
    """Boolean keep-masks (True = may be non-zero) for the sparse weight matrices of a model."""

    masks: dict[str, torch.Tensor]

    @classmethod
    def capture(cls, model: nn.Module, min_sparsity: float = 0.01) -> SparsityMasks:
        """Masks of every weight matrix whose fraction of exact zeros is at least ``min_sparsity``.

        The threshold keeps an ordinary dense model (a handful of zeros, e.g. a padding embedding row) unmasked.
        """
        masks = {}
        for name, param in model.named_parameters():
            if param.dim() < 2 or _ADAPTER_PARAM.search(name):
                continue
            keep = param.detach() != 0
            if 1.0 - keep.float().mean().item() >= min_sparsity:
                masks[canonical_name(name)] = keep.cpu()
        return cls(masks)

    def __len__(self) -> int:
        return len(self.masks)

    def apply(self, model: nn.Module) -> int:
        """Zeros every masked entry in place; returns how many parameters were masked."""
        applied = 0
        with torch.no_grad():
            for name, param in model.named_parameters():
                keep = self.masks.get(canonical_name(name))
                if keep is None:
                    continue
                if keep.shape != param.shape:
                    raise ValueError(
                        f"sparsity mask for {name} has shape {tuple(keep.shape)}, weight {tuple(param.shape)}"
                    )
                param.mul_(keep.to(device=param.device, dtype=param.dtype))
                applied += 1
        return applied

    def num_masked(self) -> int:
        """Entries held at zero by the masks."""
        return sum(int((~keep).sum()) for keep in self.masks.values())

    def violations(self, model: nn.Module) -> int:
        """Masked entries that are currently non-zero (0 after ``apply``)."""
        count = 0
        for name, param in model.named_parameters():
            keep = self.masks.get(canonical_name(name))
            if keep is not None:
                count += int((param.detach().cpu()[~keep] != 0).sum())
        return count

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
        """Re-applies the masks after every ``optimizer.step()`` (a torch step post-hook)."""
        return optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: self.apply(model))


class SparsityCallback(TrainerCallback):
    """For ``transformers.Trainer`` (and TRL trainers): re-applies the masks after each optimizer step."""

    def __init__(self, masks: SparsityMasks) -> None:
        self.masks = masks

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: object,
    ) -> None:
        if model is not None:  # the CallbackHandler always passes the model (transformers 5.23)
            self.masks.apply(model)
