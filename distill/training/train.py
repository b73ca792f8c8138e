"""``distill train``: distil a teacher into a student, single process or under ``accelerate launch`` (DDP, DeepSpeed).

The config is :class:`~distill.training.config.TrainConfig` (YAML with ``--config``, every field overridable as
``--field value``); the run is :class:`~distill.training.loop.Distiller`: set-up steps
(:mod:`distill.training.setup`), one readable step (:mod:`distill.training.step`), the loop, held-out figures
(:mod:`distill.evaluation.evaluator`), checkpoints (:mod:`distill.training.checkpoint`). A SIGTERM/SIGUSR1 saves a
checkpoint on every rank and exits 75; rerun with ``--resume auto``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from distill.training.config import TrainConfig, prepare_output_dir
from distill.training.loop import Distiller
from distill.training.runtime import exit_launched_process
from kd_core import ownership
from kd_core.commands import Stopped, stop_code
from kd_core.config import parse_command_line


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Per-file save messages and the served teacher's per-request lines (httpx2, openai 3.60's client) drown the bar.
    for noisy in ("accelerate", "DeepSpeed", "deepspeed", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


Config = TrainConfig


@dataclasses.dataclass
class TrainResult:
    """What :func:`run` returns."""

    output_dir: Path
    steps: int  # optimizer steps done (the checkpointed step when preempted)
    summary: dict[str, Any] | None  # the content of summary.json; None when preempted
    stopped: str | None = None  # kd_core.commands.PREEMPTED after a SIGTERM/SIGUSR1 save; None = finished


def run(cfg: TrainConfig) -> TrainResult:
    """Trains (resuming as ``cfg.resume`` says) and exports ``final/``; on SIGTERM/SIGUSR1 it saves a checkpoint
    and returns with ``stopped`` set. ``--resume auto`` on a finished run says so and returns its summary, rewriting
    nothing. The output directory is checked here, once, before anything loads."""
    out = prepare_output_dir(cfg)
    try:  # the main process holds the output directory's lock until the run ends (kd_core.ownership)
        summary_file = out / "summary.json"  # prepare_output_dir checked it belongs to a training run
        summary = json.loads(summary_file.read_text()) if cfg.resume == "auto" and summary_file.is_file() else None
        # A larger max_steps extends a finished run from its last checkpoint (as Trainer's resume does); otherwise
        # the run is done and nothing may be rewritten.
        if summary is not None and (cfg.max_steps is None or cfg.max_steps <= summary.get("steps", 0)):
            print(
                f"distill train: {out} holds a finished run ({summary.get('steps')} steps); nothing to do (pass "
                "--overwrite_output_dir to train it again, or choose another output_dir)",
                file=sys.stderr,
                flush=True,
            )
            return TrainResult(out, summary.get("steps", 0), summary)
        distiller = Distiller(cfg, out)
        try:
            summary = distiller.train()
        except Stopped as stop:  # preempted, after every rank saved its checkpoint
            return TrainResult(out, distiller.step, None, stop.reason)
        return TrainResult(out, summary["steps"], summary)
    finally:
        if ownership.held(out) is not None:
            ownership.held(out).release()


def main(argv: list[str]) -> int:
    setup_logging()
    cfg = parse_command_line(TrainConfig, argv, "distill train", __doc__)
    return exit_launched_process(stop_code(run(cfg).stopped))
