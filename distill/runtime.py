"""ZeRO-3 helpers shared by every layer of ``distill`` that runs a model (evaluation, training): whether parameters
are partitioned, gathering them for read-only use, letting a module use a parameter another module owns, and the
plain module inside a wrapper.

They sit below every sub-package so that evaluation never imports training. Each names the DeepSpeed release whose
behaviour it relies on (``constraints.txt``: deepspeed 0.19.8, accelerate 1.15.0). The accelerate and launch
workarounds of a training run stay in :mod:`distill.training.runtime`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator


def zero3_enabled(accelerator: Accelerator) -> bool:
    """Whether parameters are partitioned across ranks (DeepSpeed ZeRO stage 3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.zero_stage == 3


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """Lets ZeRO-3 gather ``parameter`` for ``module``'s forward and backward although another module owns it.

    DeepSpeed 0.19.8 gathers a parameter only around its owner's ``forward``; the chunked kernels read the student's
    lm_head weight directly, outside ``lm_head.forward``."""
    import deepspeed

    deepspeed.zero.register_external_parameter(module, parameter)


def zero3_gathered(params: list[nn.Parameter], enabled: bool) -> contextlib.AbstractContextManager[object]:
    """Gathers ZeRO-3 partitioned parameters for read-only use (DeepSpeed 0.19.8 ``GatheredParameters``, a
    collective: every rank must enter it); a no-op otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def inner(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP or DeepSpeed wrapper."""
    return model.module if hasattr(model, "module") else model
