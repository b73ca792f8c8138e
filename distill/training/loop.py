"""A training run in progress (:class:`Distiller`) and its loop.

``Distiller(cfg)`` runs the set-up steps of :mod:`distill.training.setup` in order and holds what they built;
:meth:`Distiller.train` is the loop: resume, then steps (:mod:`distill.training.step`) with logging, evaluation
(:class:`distill.evaluation.evaluator.Evaluator`) and checkpoints (:mod:`distill.training.checkpoint`) at their
intervals, then the final evaluation, checkpoint and export. A SIGTERM/SIGUSR1 (Slurm preemption) makes every rank
save together and raise :class:`kd_core.commands.Stopped`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.data.batching import BatchStream
from distill.evaluation.evaluator import Evaluator
from distill.evaluation.metrics import load_accuracy_set
from distill.losses.objective import TeacherTargets
from distill.runtime import inner, zero3_enabled
from distill.student.models import check_paths, load_tokenizer, parameter_count, resolve_task
from distill.training import checkpoint as ckpt
from distill.training import setup, step
from distill.training.config import (
    TrainConfig,
    check_trackers,
    claim_output_dir,
    ownership_settings,
    prepare_output_dir,
)
from distill.training.export import export_run
from distill.training.on_policy import Sampler
from distill.training.runtime import make_accelerator
from distill.training.served import ServedTeacher, TeacherLost
from kd_core import ownership
from kd_core.atomic import atomic_write_json
from kd_core.commands import PREEMPTED, Stopped
from kd_core.config import save_config, to_dict

logger = logging.getLogger("distill")
TEACHER_LOST = "teacher_lost"  # the ``stopped`` reason when the served teacher failed for good (exit 3)


class Distiller:
    """Everything a run holds: the config, the accelerator, data and its position, the prepared student with its
    objective, optimizer and schedule, the teacher signal, the sampler, the evaluator, the step count."""

    def __init__(self, cfg: TrainConfig, output_dir: Path | None = None) -> None:
        """``output_dir``: the run's directory as :func:`~distill.training.config.prepare_output_dir` checked it
        (:func:`distill.training.train.run` checks it once, before anything loads); None checks it here."""
        self.cfg = cfg
        check_paths(cfg.model)
        check_trackers(cfg.report_to)
        self.output_dir = output_dir if output_dir is not None else prepare_output_dir(cfg)
        self.accelerator = acc = make_accelerator(
            cfg.gradient_accumulation_steps,
            cfg.bf16,
            [t for t in cfg.report_to if t != "none"],
            self.output_dir,
            cfg.per_device_train_batch_size,
        )
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model, same_vocabulary=not cfg.loss.cross_tokenizer)
        self.cross_tokenizer = cross_tokenizer = setup.setup_cross_tokenizer(cfg, self.tokenizer)
        served = setup.setup_served_teacher(cfg, acc, self.tokenizer)
        self.train_set, eval_set = setup.setup_data(cfg, self.tokenizer, acc.num_processes, cross_tokenizer)
        accuracy_pairs = load_accuracy_set(cfg.accuracy) if cfg.accuracy.file else []
        self.task = resolve_task(cfg.model)
        setup.check_task(cfg, self.task)
        models = setup.setup_models(cfg, self.task, self.tokenizer)
        self.masks, self.packing_weight, self.vocab_size = models.masks, models.packing_weight, models.vocab_size
        store = setup.setup_store(cfg, self.tokenizer, self.vocab_size, self.train_set, cross_tokenizer)
        module = setup.setup_objective(cfg, models)
        self.stream = BatchStream(
            len(self.train_set), cfg.per_device_train_batch_size, acc.num_processes, acc.process_index, cfg.seed
        )
        self.total_steps = setup.total_steps(cfg, self.stream)
        optimizer, scheduler = setup.setup_optimizer(cfg, module, self.total_steps)
        self.module, self.optimizer, self.scheduler = acc.prepare(module, optimizer, scheduler)
        self.zero3 = zero3_enabled(acc)
        setup.check_zero3(self.module, models, self.task, self.zero3)
        match = setup.vocab_match(cross_tokenizer, self.tokenizer, models) if cross_tokenizer is not None else None
        self.teacher = setup.setup_teacher_signal(cfg, acc, models.teacher, store, match, served)
        self.sampler = (
            Sampler(cfg.on_policy, cfg.seed, acc.process_index, acc.device) if cfg.on_policy.enabled else None
        )
        self.evaluator = Evaluator(
            acc,
            self.tokenizer,
            eval_set,
            accuracy_pairs,
            cfg.accuracy,
            batch_size=cfg.per_device_eval_batch_size,
            vocab_size=self.vocab_size,
            task=self.task,
            pooling=cfg.loss.features.pooling,
            chunk_size=cfg.loss.chunk_size,
            zero3=self.zero3,
        )
        self.step = 0
        self.stop_signal: int | None = None
        self.metrics_file = self.output_dir / "metrics.jsonl"

    # The step (distill/training/step.py), as methods: tests and benchmarks call and wrap them on the run.
    def next_micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], list[str], list[dict[str, float]]]:
        return step.next_micro_batches(self)

    def teacher_targets(
        self, batch: dict[str, torch.Tensor]
    ) -> contextlib.AbstractContextManager[TeacherTargets | None]:
        return step.teacher_targets(self.teacher, batch)

    def training_step(self) -> dict[str, float]:
        return step.training_step(self)

    def guarded_step(self) -> dict[str, float]:
        """:meth:`training_step`; when the served teacher is lost (:class:`TeacherLost`: every rank together, before
        the same micro-batch's forward, so no optimizer step has happened), the step's partial gradients are dropped,
        the data and sampling positions, accelerate's micro-step count and the random generators go back to where the
        step began, a checkpoint of them is saved and the run stops (exit 3): ``--resume auto`` redoes the step."""
        if not isinstance(self.teacher, ServedTeacher):
            return self.training_step()
        consumed = self.stream.samples_consumed
        sampling = self.sampler.state_dict() if self.sampler is not None else None
        if sampling is not None:
            sampling["buffer"] = list(sampling["buffer"])  # the live list grows during the step
        # accelerate 1.15 saves its micro-step count with the state and counts syncs from it on resume: saved in
        # mid-step, the resumed run would step the optimizer after the wrong micro-batch.
        micro_step, generators = self.accelerator.step, random_states()
        try:
            return self.training_step()
        except TeacherLost as lost:
            self.stream.samples_consumed = consumed
            if sampling is not None:
                self.sampler.load_state_dict(sampling)
            # A checkpoint holds no gradients (deepspeed 0.19.8 saves weights, fp32 partitions and optimizer
            # moments; torch, parameters and optimizer state): the stop below drops what ZeRO accumulated.
            self.module.zero_grad()  # to None (torch 2.13; DeepSpeed's engine takes no argument)
            self.accelerator.step = micro_step
            set_random_states(generators)  # the forwards already run drew dropout masks
            if not (self.output_dir / f"{ckpt.PREFIX}{self.step}").exists():
                self.save()
            logger.error(
                "%s; checkpoint-%d holds the position before the failed step: once the server is back, rerun "
                "with --resume auto",
                lost,
                self.step,
            )
            self.accelerator.end_training()
            raise Stopped(TEACHER_LOST, f"checkpoint saved at step {self.step}") from None

    def evaluate(self) -> dict[str, float]:
        teacher = self.teacher.model if self.teacher is not None else None
        return self.evaluator.evaluate(inner(self.module).student, teacher)

    # Checkpoints (distill/training/checkpoint.py)
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_consumed": self.stream.samples_consumed,
            "epoch": self.stream.epoch,
            "seed": self.cfg.seed,
            "world_size": self.accelerator.num_processes,
            "student_config": inner(self.module).student.config.to_diff_dict(),
            "loss_terms": self.cfg.loss.terms,
            "loss_terms_at_end": self.cfg.loss.terms_at_end,
            "train_file": self.cfg.data.train_file,
        }

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.step,
            self.trainer_state(),
            self.cfg.save_total_limit,
            write_extra=self.write_checkpoint_extras,
            write_rank_files=self.sampler.save if self.sampler is not None else None,
        )

    def write_checkpoint_extras(self, directory: Path) -> None:
        """The resolved config, and the student's config and tokenizer so that ``distill export`` rebuilds the
        model from the checkpoint alone (written before the manifest, so they are covered by it)."""
        save_config(self.cfg, directory / "config.yaml")
        inner(self.module).student.config.save_pretrained(directory / ckpt.STUDENT_DIR)
        self.tokenizer.save_pretrained(directory / ckpt.STUDENT_DIR)

    def resume(self) -> None:
        found = ckpt.load_for_resume(
            self.cfg.resume,
            self.output_dir,
            self.accelerator,
            self.trainer_state(),
            self.tokenizer,
            ownership_settings(self.cfg),
        )
        if found is None:
            return
        path, state = found
        self.step = state["step"]
        self.stream.resume_at(state["samples_consumed"], state["world_size"])
        if self.sampler is not None and not self.sampler.load(path):
            logger.warning(
                "%s holds no on-policy sampler state for rank %d: sampling continues from the seed (the "
                "samples differ from an uninterrupted run)",
                path,
                self.accelerator.process_index,
            )
        logger.info("resumed from %s at step %d", path, self.step)

    # Signals and logs
    @contextlib.contextmanager
    def stop_signals(self):
        """While the loop runs, SIGTERM and SIGUSR1 (a scheduler's preemption notice) ask every rank to save and
        stop; the previous handlers come back when it ends. A process that trains in-process and carries on (the
        quickstarts, a notebook) stays killable, and the workers it forks later (``datasets.map`` with ``num_proc``
        terminates its pool with SIGTERM) do not inherit a handler that swallows the signal and hang."""

        def request_stop(signum, _frame) -> None:
            self.stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_requested(self) -> bool:
        """Whether any rank received a stop signal (all ranks must agree to save together)."""
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    def log(self, values: dict[str, float]) -> None:
        values = {"step": self.step, **values}
        self.accelerator.log({k: v for k, v in values.items() if k != "step"}, step=self.step)
        if self.accelerator.is_main_process:
            with open(self.metrics_file, "a") as handle:
                handle.write(json.dumps(values) + "\n")

    # The loop
    def start(self) -> None:
        """Resume, claim the directory, save the resolved config, start trackers."""
        acc, cfg = self.accelerator, self.cfg
        self.resume()
        if acc.is_main_process:
            claim_output_dir(cfg, self.output_dir)
            save_config(cfg, self.output_dir / "config.yaml")
        acc.wait_for_everyone()
        acc.init_trackers("distill", config=_flat(to_dict(cfg)))
        inner(self.module).student.train()

    def train(self) -> dict[str, Any]:
        """Every remaining step, then the final evaluation, checkpoint and export; returns the summary. Raises
        :class:`Stopped` (``PREEMPTED``) once every rank saved after a stop signal."""
        cfg = self.cfg
        self.start()
        with self.stop_signals():
            bar = tqdm(
                total=self.total_steps, initial=self.step, desc="distill", disable=not self.accelerator.is_main_process
            )
            history: list[dict[str, float]] = []
            window: list[dict[str, float]] = []
            started = time.time()
            while self.step < self.total_steps:
                step_started = time.perf_counter()
                values = self.guarded_step()
                values["step_seconds"] = time.perf_counter() - step_started
                self.step += 1
                window.append(values)
                bar.update(1)
                bar.set_postfix(self.progress(values))
                if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                    history.append({"step": self.step, **self.log_window(window)})
                    window = []
                if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                    self.log(self.evaluate())
                stop = self.stop_requested()
                if self.step % cfg.save_steps == 0 or stop:
                    self.save()
                if stop:
                    bar.close()
                    logger.warning("stop signal received: checkpoint saved at step %d; exiting", self.step)
                    self.accelerator.end_training()
                    raise Stopped(PREEMPTED, f"checkpoint saved at step {self.step}")
            bar.close()
            return self.finish(history, started)

    def progress(self, values: dict[str, float]) -> dict[str, str]:
        """The progress bar's figures for a step."""
        postfix = {"loss": f"{values['loss']:.4f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"}
        if self.sampler is not None:  # the share of the step spent sampling
            postfix["sampling"] = f"{values.get('on_policy/sample_seconds', 0.0) / values['step_seconds']:.0%}"
        return postfix

    def log_window(self, window: list[dict[str, float]]) -> dict[str, float]:
        """Logs the steps since the last log, averaged over the steps that have each figure (sampling figures
        exist on sampled steps only); returns what it logged."""
        keys = dict.fromkeys(k for w in window for k in w)
        averaged = {f"train/{k}": sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in keys}
        averaged["train/lr"] = self.scheduler.get_last_lr()[0]
        self.log(averaged)
        return averaged

    def finish(self, history: list[dict[str, float]], started: float) -> dict[str, Any]:
        """The final evaluation, checkpoint (unless the last periodic save was this step) and ``final/``; the
        summary, written last (with the directory marked finished) by the main process."""
        acc = self.accelerator
        final_eval = self.evaluate()
        if final_eval:
            self.log(final_eval)
        last = self.output_dir / f"{ckpt.PREFIX}{self.step}"
        if not last.exists():
            self.save()
        export_run(acc, self.module, self.tokenizer, self.cfg.lora.enabled, last, self.output_dir / "final")
        acc.end_training()
        summary = {
            "steps": self.step,
            "train_seconds": time.time() - started,
            "student_parameters": parameter_count(inner(self.module).student),
            "final_eval": final_eval,
            "history": ckpt.logged_history(self.metrics_file, self.step) or history,  # every step, across resumes
        }
        if acc.is_main_process:
            atomic_write_json(self.output_dir / "summary.json", summary)
            ownership.mark_finished(self.output_dir)
            if ownership.held(self.output_dir) is not None:
                ownership.held(self.output_dir).release()
        return summary


def random_states() -> dict[str, Any]:
    """The generators accelerate saves with a checkpoint (Python, NumPy, torch and CUDA)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def set_random_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Trackers take flat scalar hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
