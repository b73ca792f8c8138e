"""The workarounds a run needs around accelerate, DeepSpeed and torch.distributed, in one place.

Each shim names the release whose behaviour it works around (read from its source where possible), so that an
upgrade of the pins (``constraints.txt``: accelerate 1.15.0, deepspeed 0.19.8, torch 2.13.0) knows what to recheck.
Everything else in ``distill train`` uses accelerate's public API only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kd_core.config import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator


def launched() -> bool:
    """Whether this process is one rank of a multi-process launch (torchrun, accelerate launch, DeepSpeed)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def deepspeed_launch() -> bool:
    """Whether accelerate was launched with a DeepSpeed config (``accelerate launch`` sets this variable)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"


def check_deepspeed_config_file() -> None:
    """A clear one-line error, before any model is loaded, when the launch config names a missing DeepSpeed JSON
    (accelerate 1.15 only passes the path on in ACCELERATE_DEEPSPEED_CONFIG_FILE and fails later with a traceback)."""
    if not deepspeed_launch():
        return
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and not Path(path).is_file():
        raise ConfigError(
            f"deepspeed_config_file: {path} (named by the accelerate launch config) does not exist "
            f"(relative paths are read from the working directory {os.getcwd()})"
        )


def make_accelerator(
    gradient_accumulation_steps: int, bf16: bool, report_to: list[str], project_dir: Path, micro_batch_size: int
) -> Accelerator:
    """A fresh Accelerator for one run of this process, whatever ran before it in the same process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    check_deepspeed_config_file()
    deepspeed = deepspeed_launch()
    multi_cpu = (launched() or deepspeed) and not torch.cuda.is_available()
    # accelerate 1.15 (PartialState._prepare_backend) picks no backend for a DeepSpeed launch without CUDA, and a
    # PartialState without a backend counts one process per rank: name gloo.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if multi_cpu else []
    # accelerate 1.15 keeps mixed precision and the DeepSpeed plugin in a process-wide singleton and refuses a second
    # Accelerator with other settings (AcceleratorState._check_initialized); runs made one after another in a process
    # (the quickstart's stages, Lion's iterations) each need their own. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision="bf16" if bf16 else "no",
        log_with=report_to or None,
        project_dir=str(project_dir),
        kwargs_handlers=handlers,
        # Without `cpu=True`, accelerate 1.15 classifies a torchrun CPU job as DistributedType.NO: no DDP wrapper
        # and `reduce` silently returns the local value. (DeepSpeed has its own path and must not get it.)
        cpu=multi_cpu and not deepspeed,
        # accelerate 1.15 otherwise steps the schedule num_processes times per optimizer step (it assumes a
        # dataloader sharded by process); the trainer steps it itself once per optimizer step.
        step_scheduler_with_optimizer=False,
    )
    if accelerator.state.deepspeed_plugin is not None:
        # Batches are fed by the trainer (BatchStream), so accelerate 1.15 has no dataloader to read the "auto"
        # micro-batch size from; its error message names this key as the way to give it.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    return accelerator


def exit_launched_process(code: int) -> int:
    """Ends a rank of a multi-process launch with ``code`` without interpreter teardown; returns ``code`` otherwise.

    Called once all is saved and closed and the process group destroyed. Under gloo (CPU) with torch 2.13 and
    DeepSpeed 0.19.8 a rank then now and then aborts in interpreter teardown ("terminate called without an active
    exception", exit -6; seen in runs, not located in their source) and the launcher reports a failed run, or
    loses the preemption code."""
    if not launched():
        return code
    report_exit_code(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Set by ``python -m distill.training.launch`` (distill/training/launch.py) for the ranks it starts: each rank that
# ends through exit_launched_process writes ``<dir>/rank-<LOCAL_RANK>`` = "<exit code> <LOCAL_WORLD_SIZE>", since
# torch 2.13's elastic agent drops the ranks' exit codes when it is itself signalled (see that module).
LAUNCH_STATUS_ENV = "DISTILL_LAUNCH_STATUS_DIR"


def report_exit_code(code: int) -> None:
    """Tells the launch wrapper, if any, the exit code this rank is about to end with (written atomically)."""
    status_dir = os.environ.get(LAUNCH_STATUS_ENV)
    if not status_dir:
        return
    local_rank = os.environ.get("LOCAL_RANK", "0")
    target = Path(status_dir) / f"rank-{local_rank}"
    with contextlib.suppress(OSError):
        partial = target.with_suffix(".tmp")
        partial.write_text(f"{code} {os.environ.get('LOCAL_WORLD_SIZE', '1')}\n")
        os.replace(partial, target)
