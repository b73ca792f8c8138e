"""Importance of channels, heads and layers, measured once on calibration data and cached.

One forward pass over the calibration set records, for every prunable space (see ``families``):

- activation importance (Minitron): per channel, the mean |activation| over a sample's real tokens, then the L2
  norm of those means over the samples. Heads/KV groups are read from the input of the attention output projection,
  MLP channels from the input of the down projection, hidden channels from the outputs of every norm layer;
- Block Influence (ShortGPT) of each layer: 1 - cos(layer input, layer output), averaged over real tokens;
- Wanda input norms: for every linear layer inside the blocks, the sum of squared inputs per input column.

Everything is saved as safetensors under a cache key made from the model files and the calibration tokens, so a
second ``distill prune`` with other target shapes reuses it without another pass.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from distill.student.prune.calibration import Calibration
from distill.student.prune.families import Family
from kd_core.atomic import atomic_path

CACHE_FORMAT = 1  # bump when what is measured changes, so old cache entries are ignored


@dataclass
class Importance:
    """Calibration statistics of one model (teacher layer numbering)."""

    channels: dict[str, torch.Tensor]  # space name ("hidden", "q.3", "mlp.3") -> score per channel
    block_influence: torch.Tensor  # [num_layers]
    input_sq_norms: dict[str, torch.Tensor]  # linear module name -> sum of squared inputs per input column

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"channels/{k}": v for k, v in self.channels.items()}
        out.update({f"inputs/{k}": v for k, v in self.input_sq_norms.items()})
        out["block_influence"] = self.block_influence
        return {k: v.contiguous().float() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Importance:
        channels = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("channels/")}
        inputs = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("inputs/")}
        return cls(channels, tensors["block_influence"], inputs)


class _Recorder:
    """Forward hooks that accumulate the statistics above; ``mask`` is the current batch's real-token mask."""

    def __init__(self) -> None:
        self.mask = torch.empty(0)
        self.sq_means: dict[str, torch.Tensor] = {}  # key -> sum over samples of (mean |x| over tokens)^2
        self.input_sq: dict[str, torch.Tensor] = {}
        self.influence_sum: dict[int, float] = {}
        self.layer_inputs: dict[int, torch.Tensor] = {}
        self.tokens = 0
        # q/k/v (and gate/up) read the very same tensor: square it once, not three times.
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def channel_means(self, key: str, x: torch.Tensor) -> None:
        m = self.mask.to(torch.float32)  # [B, S]
        # einsum fuses the masking into one reduction (no [B, S, C] temporary for the product).
        per_sample = torch.einsum("bsc,bs->bc", x.detach().float().abs(), m) / m.sum(1, keepdim=True).clamp(min=1)
        self.sq_means[key] = self.sq_means.get(key, 0) + per_sample.square().sum(0)

    def input_norms(self, name: str, x: torch.Tensor) -> None:
        last_x, last_total = self._last
        if x is last_x:
            total = last_total
        else:
            # Padding never counts: the mask zeroes its rows in the reduction.
            total = torch.einsum("bsc,bs->c", x.detach().float().square(), self.mask.to(torch.float32))
            self._last = (x, total)
        self.input_sq[name] = self.input_sq.get(name, 0) + total

    def influence(self, layer: int, out: torch.Tensor) -> None:
        x_in = self.layer_inputs.pop(layer)
        cos = torch.nn.functional.cosine_similarity(x_in.float(), out.detach().float(), dim=-1)  # [B, S]
        self.influence_sum[layer] = self.influence_sum.get(layer, 0.0) + float(((1 - cos) * self.mask).sum())


def collect_importance(model: PreTrainedModel, family: Family, calibration: Calibration, batch_size: int) -> Importance:
    """Runs the calibration set through ``model`` once with hooks installed and returns the statistics."""
    rec = _Recorder()
    layers = model.get_submodule(family.layers_prefix.rstrip("."))
    handles = []
    for i, layer in enumerate(layers):
        attn_out = layer.get_submodule(family.attn_out_proj)
        mlp_down = layer.get_submodule(family.mlp_down_proj)
        handles.append(attn_out.register_forward_pre_hook(lambda _m, args, i=i: rec.channel_means(f"q.{i}", args[0])))
        handles.append(mlp_down.register_forward_pre_hook(lambda _m, args, i=i: rec.channel_means(f"mlp.{i}", args[0])))
        # Layers are called with hidden_states first, positionally (Llama, Qwen, Mistral and BERT in 5.23).
        handles.append(layer.register_forward_pre_hook(lambda _m, args, i=i: rec.layer_inputs.__setitem__(i, args[0])))
        handles.append(layer.register_forward_hook(lambda _m, _a, out, i=i: rec.influence(i, out)))
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                full = f"{family.layers_prefix}{i}.{name}"
                handles.append(module.register_forward_pre_hook(lambda _m, a, n=full: rec.input_norms(n, a[0])))
    for name, module in model.named_modules():
        if re.fullmatch(family.norm_modules, name):
            handles.append(
                module.register_forward_hook(lambda _m, _a, out, n=name: rec.channel_means(f"norm:{n}", out))
            )
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for input_ids, attention_mask in calibration.batches(batch_size):
                rec.mask = attention_mask.to(device)
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                rec.tokens += int(attention_mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        rec._last = (None, None)
    channels = {k: v.sqrt().cpu() for k, v in rec.sq_means.items() if not k.startswith("norm:")}
    # Hidden channels: Minitron sums the per-norm-layer scores over all layers.
    channels["hidden"] = sum(v.sqrt().cpu() for k, v in rec.sq_means.items() if k.startswith("norm:"))
    influence = torch.tensor([rec.influence_sum[i] / rec.tokens for i in range(len(layers))])
    return Importance(channels, influence, {k: v.cpu() for k, v in rec.input_sq.items()})


def model_fingerprint(model_dir: Path) -> str:
    """Hash of the config and every weight file (content, not dates): a changed checkpoint is a new cache key. A
    GGUF file holds both, so it is hashed whole."""
    if model_dir.is_file():
        digest = hashlib.sha256(model_dir.name.encode())
        files = [model_dir]
    else:
        digest = hashlib.sha256((model_dir / "config.json").read_bytes())
        files = sorted(model_dir.glob("*.safetensors"))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def cached_importance(
    model: PreTrainedModel,
    family: Family,
    model_dir: Path,
    calibration: Calibration,
    batch_size: int,
    cache_dir: Path,
) -> tuple[Importance, Path, bool]:
    """Importance from ``cache_dir`` when this model+calibration pair was measured before, else measured and stored.

    Returns the statistics, the cache file and whether it was a cache hit.
    """
    # The dtype the model runs in changes the statistics (a bf16 forward is not a float32 one): part of the key.
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    key = f"{model_fingerprint(model_dir)}-{calibration.fingerprint()}-{dtype}-v{CACHE_FORMAT}"
    path = cache_dir / f"importance-{key}.safetensors"
    if path.is_file():
        return Importance.from_tensors(load_file(path)), path, True
    importance = collect_importance(model, family, calibration, batch_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model_dir": str(model_dir), "calibration": calibration.source, "samples": str(calibration.num_samples)}
    with atomic_path(path) as tmp:  # a crash never leaves a truncated cache entry that a later run would trust
        save_file(importance.to_tensors(), str(tmp), metadata={"info": json.dumps(meta)})
    return importance, path, False
