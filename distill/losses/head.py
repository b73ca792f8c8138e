"""The model's own output head: how a causal LM turns its final hidden states into next-token logits.

Every logit path of the project (the student's objective, the online teacher, ``precompute``, ``eval``, on-policy
figures) goes from hidden states to logits through one :class:`OutputHead`, a chunk of rows at a time, so full
``[tokens, vocabulary]`` logits never exist. What a head does is read from transformers 5.24's ``*ForCausalLM.forward``
of each family (``logits = lm_head(hidden)`` and then, in this order):

- a bias, when the ``lm_head`` linear has one;
- a scale: Cohere / Cohere2 multiply by ``config.logit_scale``, Granite (and its MoE variants) divide by
  ``config.logits_scaling``, HyperCLOVA X multiplies by ``config.logits_scaling``, Falcon-H1 by
  ``config.lm_head_multiplier``;
- a soft-cap ``c * tanh(logits / c)``: Gemma-2, Gemma-3 (``gemma3_text``), Gemma-3n, Gemma-4, VaultGemma, nanochat
  and Beam with ``config.final_logit_softcapping``, RecurrentGemma with ``config.logits_soft_cap``.

Any other ``model_type`` whose (text) config sets one of the head attributes below is refused in one line naming
it (:func:`output_head`): its forward may do something this module does not reproduce. Families without such an
attribute (Llama, Qwen, Mistral, Phi, ...) have a plain ``hidden @ weight.T`` head, computed exactly as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from kd_core.config import ConfigError


@dataclasses.dataclass(frozen=True)
class OutputHead:
    """``logits = softcap(scale * (hidden @ weight.T + bias))``, ``softcap(x) = c * tanh(x / c)`` when ``softcap``
    is set. ``weight`` and ``bias`` are the model's own parameters (ZeRO-3 gathers them; the kernels compute their
    gradients), never copies."""

    weight: Tensor  # [V, H]
    bias: Tensor | None = None  # [V]
    scale: float = 1.0
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        """Whether the head is the bare matmul (the kernels then run exactly the pre-head code path)."""
        return self.bias is None and self.scale == 1.0 and self.softcap is None

    @property
    def parameters(self) -> list[Tensor]:
        """The tensors to gather under ZeRO-3."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def logits(self, hidden: Tensor, vocab: int | None = None) -> Tensor:
        """fp32 logits ``[n, vocab]`` of ``hidden [n, H]``, no gradient: for a chunk of rows at a time (eval,
        precompute). The product runs in the inputs' dtype, as the model's own lm_head does, then is upcast."""
        vocab = vocab or self.weight.shape[0]
        with torch.no_grad():
            out = torch.empty((hidden.shape[0], vocab), dtype=torch.float32, device=hidden.device)
            return project_into(out, hidden, self.weight[:vocab], self, 1.0)


def as_head(head: Tensor | OutputHead) -> OutputHead:
    """A bare lm_head weight is a plain head (the kernels' tensor-level callers and tests pass weights)."""
    return head if isinstance(head, OutputHead) else OutputHead(head)


def matmul_head(weight: Tensor) -> Tensor:
    """The head weight as the kernels multiply with it: cast once to autocast's dtype when autocast is on (bf16 mixed
    precision), as the model's own lm_head matmuls would run, instead of in fp32 or cast again for every chunk.
    Only the products run in it: log-softmax, divergences and the gradient accumulators stay fp32."""
    device = weight.device.type
    if torch.is_autocast_enabled(device) and weight.dtype == torch.float32:
        return weight.to(torch.get_autocast_dtype(device))
    return weight


def project_into(
    out: Tensor, hidden: Tensor, weight: Tensor, head: OutputHead, inv_t: float, slope: Tensor | None = None
) -> Tensor:
    """``out = head(hidden) / T`` in fp32, ``weight`` the head's (cropped, possibly autocast-cast) weight.

    Low-precision inputs are projected in their own dtype first (what the model's own lm_head would output), then
    upcast; bias, scale and soft-cap are applied in fp32. With ``slope`` (a tile like ``out``), it receives
    ``d logits / d (hidden @ weight.T + bias)`` for a soft-capped head (``scale * (1 - tanh^2)``), which
    :func:`chain_head` multiplies into the logit gradient; heads without a soft-cap need no tile (the slope is
    the constant ``scale``)."""
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=out)
    else:
        out.copy_(hidden @ weight.t())
    if head.bias is not None:
        out.add_(head.bias[: out.shape[1]].float())
    if head.softcap is None:
        factor = head.scale * inv_t  # one pass for scale and temperature together
        return out.mul_(factor) if factor != 1.0 else out
    cap = head.softcap
    out.mul_(head.scale / cap).tanh_()
    if slope is not None:  # d(c * tanh(s * y / c)) / dy = s * (1 - tanh^2)
        torch.square(out, out=slope).neg_().add_(1.0).mul_(head.scale)
    return out.mul_(cap * inv_t)


def chain_head(grad_z: Tensor, head: OutputHead, slope: Tensor | None, factor: float = 1.0) -> Tensor:
    """The logit gradient ``grad_z`` (w.r.t. the head's output) times ``factor`` (a kernel's temperature), taken
    back in place through soft-cap and scale to the linear part ``hidden @ weight.T + bias``."""
    if slope is None:
        factor *= head.scale
    if factor != 1.0:
        grad_z.mul_(factor)
    return grad_z if slope is None else grad_z.mul_(slope)


def slope_tile(head: OutputHead, rows: int, vocab: int, device: torch.device) -> Tensor | None:
    """The extra fp32 ``[rows, vocab]`` tile a soft-capped head needs for its gradient (None for the others)."""
    return None if head.softcap is None else torch.empty((rows, vocab), dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Which families do what (transformers 5.24's *ForCausalLM.forward, read per family).

Reader = Callable[[PretrainedConfig], "tuple[float, float | None]"]  # (scale, softcap) from a text config


def _scale(name: str, inverse: bool = False) -> Reader:
    return lambda config: (1.0 / getattr(config, name) if inverse else float(getattr(config, name)), None)


def _softcap(name: str) -> Reader:
    def read(config: PretrainedConfig) -> tuple[float, float | None]:
        cap = getattr(config, name)
        return 1.0, (float(cap) if cap else None)  # the forwards skip the cap when it is None

    return read


_COHERE = _scale("logit_scale")  # logits * logit_scale
_GRANITE = _scale("logits_scaling", inverse=True)  # logits / logits_scaling
_GEMMA = _softcap("final_logit_softcapping")  # tanh(logits / cap) * cap
FAMILIES: dict[str, Reader] = {
    "cohere": _COHERE,
    "cohere2": _COHERE,
    "cohere2_moe": _COHERE,
    "granite": _GRANITE,
    "granite_swa": _GRANITE,
    "granitemoe": _GRANITE,
    "granitemoe_swa": _GRANITE,
    "granitemoehybrid": _GRANITE,
    "granitemoeshared": _GRANITE,
    "hyperclovax": _scale("logits_scaling"),
    "falcon_h1": _scale("lm_head_multiplier"),
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma3n_text": _GEMMA,
    "gemma4_text": _GEMMA,
    "vaultgemma": _GEMMA,
    "nanochat": _GEMMA,
    "beam": _GEMMA,
    "recurrent_gemma": _softcap("logits_soft_cap"),
}
# Config attributes that change logits after the lm_head in some family: an unknown family setting one is refused.
HEAD_ATTRIBUTES = (
    "logit_scale",
    "logits_scaling",
    "logits_scale",
    "logit_scaling",
    "lm_head_multiplier",
    "output_multiplier",
    "final_logit_softcapping",
    "logits_soft_cap",
    "logit_softcapping",
    "output_logit_soft_cap",
    "final_logit_softcap",
)
_NEUTRAL = (None, 1, 1.0, 0, 0.0, False)


def output_head(model: nn.Module) -> OutputHead:
    """The :class:`OutputHead` of a causal LM (a PEFT-wrapped one too); ConfigError naming the ``model_type`` when
    its head cannot be reproduced."""
    config = model.config.get_text_config()
    model_type = config.model_type
    if model_type in FAMILIES:
        scale, softcap = FAMILIES[model_type](config)
    else:
        set_here = [a for a in HEAD_ATTRIBUTES if getattr(config, a, None) not in _NEUTRAL]
        if set_here:
            raise ConfigError(
                f"model_type {model_type!r}: its config sets {', '.join(set_here)}, an output-head transformation "
                f"this version cannot reproduce (supported: plain heads and {', '.join(sorted(FAMILIES))})"
            )
        scale, softcap = 1.0, None
    module = model.get_output_embeddings()
    # nn.Linear has `bias` (None without one); peft's ModulesToSaveWrapper forwards the attribute to the wrapped head.
    bias = getattr(module, "bias", None)
    return OutputHead(module.weight, bias if isinstance(bias, Tensor) else None, scale, softcap)
