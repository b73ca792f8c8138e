"""The trainer: normalisation under accumulation and data parallelism, exact resume, and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.training.train import Distiller, TrainConfig, run
from distill.training.train import main as train_main
from kd_core.commands import EXIT_PREEMPTED, run_command
from tests.conftest import free_port, nested_config, slowed_steps

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def config(model_dirs, train_file, out, **overrides) -> TrainConfig:
    tree = {
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "save_steps": 100,
        "eval_steps": None,
        "logging_steps": 1,
        "report_to": ["none"],
        "model": {"teacher": str(model_dirs["teacher"]), "student": str(model_dirs["student"])},
        "data": {"train_file": str(train_file), "eval_fraction": 0.0},
        "loss": {"terms": {"forward_kl": 0.7, "ce": 0.3}, "chunk_size": 5},
    }
    return nested_config(TrainConfig, tree, **overrides)


def first_step_gradients(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Runs one optimizer step and returns the gradients the optimizer saw."""
    distiller = Distiller(cfg)
    seen: dict[str, torch.Tensor] = {}
    optimizer = distiller.optimizer.optimizer
    original_step = optimizer.step

    def capture(*args, **kwargs):
        for name, param in distiller.module.named_parameters():
            seen[name] = param.grad.detach().clone()
        return original_step(*args, **kwargs)

    optimizer.step = capture
    distiller.training_step()
    return seen


def test_accumulation_gives_the_same_gradient(model_dirs, train_file, tmp_path):
    whole = first_step_gradients(config(model_dirs, train_file, tmp_path / "a"))
    split = first_step_gradients(
        config(model_dirs, train_file, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    )
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def run_cli(args: list[str], launcher: list[str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable, "-m"]) + ["distill", "train", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600, **kwargs)


def cli_args(model_dirs, train_file, out, *extra: str) -> list[str]:
    return [
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--eval_steps",
        "null",
        "--report_to",
        "[none]",
        "--model.teacher",
        str(model_dirs["teacher"]),
        "--model.student",
        str(model_dirs["student"]),
        "--data.train_file",
        str(train_file),
        "--data.eval_fraction",
        "0",
        "--loss.terms",
        "{forward_kl: 0.7, ce: 0.3}",
        *extra,
    ]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(model_dirs, train_file, tmp_path):
    single = run_cli(cli_args(model_dirs, train_file, tmp_path / "one", "--per_device_train_batch_size", "8"))
    assert single.returncode == 0, single.stderr[-3000:]
    # `--cpu` would pick accelerate's single-process launcher; `--multi_gpu` runs torchrun, which on a machine
    # without CUDA gives 2 CPU processes (gloo).
    # A free port, not torchrun's default 29500, which a launch in the other pytest-xdist worker may hold.
    launcher = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
    ]
    ddp = run_cli(cli_args(model_dirs, train_file, tmp_path / "two", "--per_device_train_batch_size", "4"), launcher)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples_consumed"] == 24  # really two processes, 4 samples each
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


def logged_losses(out: Path) -> dict[int, float]:
    """Per-step training loss; after a resume the re-run steps overwrite the earlier entries."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            losses[record["step"]] = record["train/loss"]
    return losses


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_exact(model_dirs, train_file, tmp_path):
    steps = ["--max_steps", "8", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    reference = run_cli(cli_args(model_dirs, train_file, tmp_path / "ref", *steps))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    args = cli_args(model_dirs, train_file, out, *steps, "--save_steps", "2", "--save_total_limit", "null")
    process = subprocess.Popen(
        [sys.executable, "-m", "distill", "train", *args],
        env=slowed_steps(ENV, 0.3),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "checkpoint-2").exists():
        assert process.poll() is None and time.time() < deadline, "training ended before the first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert not (out / "final").exists()
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved and saved[-1] < 8

    resumed = run_cli([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoint-{saved[-1]}" in resumed.stderr
    reference_losses, resumed_losses = logged_losses(tmp_path / "ref"), logged_losses(out)
    assert resumed_losses.keys() == reference_losses.keys() == set(range(1, 9))
    for step, value in reference_losses.items():
        assert resumed_losses[step] == pytest.approx(value, abs=1e-6), step
    ref_weights, got = final_weights(tmp_path / "ref"), final_weights(out)
    for name in ref_weights:
        assert (got[name] - ref_weights[name]).abs().max().item() <= 1e-6, name


def test_an_in_process_run_hands_the_stop_signals_back(model_dirs, train_file, tmp_path, monkeypatch):
    """SIGTERM during an in-process run still stops it at a checkpoint, and after it (stopped or finished) SIGTERM
    and SIGUSR1 have their previous handlers again. The trainer's flag-setting handler used to stay installed: a
    ``datasets.map`` pool forked later inherited it, ignored the pool's SIGTERM, and the caller hung."""
    from kd_core.commands import PREEMPTED

    signals = (signal.SIGTERM, signal.SIGUSR1)
    before = [signal.getsignal(sig) for sig in signals]
    step = Distiller.training_step

    def preempted_step(self):
        if self.step == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: the step still completes
        return step(self)

    monkeypatch.setattr(Distiller, "training_step", preempted_step)
    stopped = run(config(model_dirs, train_file, tmp_path / "stopped"))
    assert stopped.stopped == PREEMPTED and stopped.steps == 1 and (tmp_path / "stopped" / "checkpoint-1").is_dir()
    assert [signal.getsignal(sig) for sig in signals] == before
    monkeypatch.setattr(Distiller, "training_step", step)
    finished = run(config(model_dirs, train_file, tmp_path / "finished", max_steps=1))
    assert finished.summary is not None and [signal.getsignal(sig) for sig in signals] == before


def test_bad_input_exits_2_and_writes_nothing(model_dirs, train_file, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cases = [
        (cli_args(model_dirs, train_file, out), "exists and is not empty"),
        (cli_args(model_dirs, train_file, tmp_path / "x", "--max_step", "3"), "did you mean '--max_steps'"),
        (
            cli_args(model_dirs, train_file, tmp_path / "x", "--learning_rate", "fast"),
            "learning_rate: expected a number",
        ),
        (cli_args(model_dirs, tmp_path / "missing.jsonl", tmp_path / "x"), "data.train_file: file not found"),
        (
            cli_args(model_dirs, train_file, tmp_path / "x", "--model.teacher", str(tmp_path)),
            "model.teacher: expected a model directory",
        ),
        (
            cli_args(model_dirs, train_file, tmp_path / "x", "--loss.terms", "{forward_kll: 1}"),
            "did you mean 'forward_kl'",
        ),
    ]
    # The first case runs as a real process (exit status, stderr); the rest go through the same `run_command`
    # entry point in-process, which is what turns a ConfigError into "error: ..." and status 2.
    result = run_cli(cases[0][0])
    assert result.returncode == 2 and cases[0][1] in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    for args, message in cases[1:]:
        status = run_command(train_main, args)
        err = capsys.readouterr().err
        assert status == 2, (args, err[-2000:])
        assert message in err and err.strip().splitlines()[-1].startswith("error:"), err[-2000:]
    assert (out / "keep.txt").read_text() == "precious" and sorted(os.listdir(out)) == ["keep.txt"]
    assert not (tmp_path / "x").exists()


def test_tokenizer_mismatch_names_both(model_dirs, train_file, tmp_path):
    from distill.student.tiny import tiny_llama, train_tokenizer

    other_tok = train_tokenizer(["completely different corpus of words"] * 10, vocab_size=280)
    other = tmp_path / "other_student"
    tiny_llama(len(other_tok), hidden_size=32, num_layers=1).save_pretrained(other)
    other_tok.save_pretrained(other)
    result = run_cli(cli_args(model_dirs, train_file, tmp_path / "x", "--model.student", str(other)))
    assert result.returncode == 2
    assert "tokenizer mismatch" in result.stderr and str(other) in result.stderr
    assert str(model_dirs["teacher"]) in result.stderr


def test_padded_teacher_vocab_is_cropped(model_dirs, train_file, tmp_path, tokenizer):
    """A teacher whose embedding has extra padding rows (as Qwen's 151,936 vs 152,064) distils fine."""
    from transformers import AutoModelForCausalLM

    padded = tmp_path / "padded_teacher"
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"])
    teacher.resize_token_embeddings(len(tokenizer) + 64)
    teacher.save_pretrained(padded)
    tokenizer.save_pretrained(padded)
    cfg = config(model_dirs, train_file, tmp_path / "out", **{"model.teacher": str(padded), "max_steps": 1})
    summary = run(cfg).summary
    assert summary["steps"] == 1 and (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_bf16_training_runs_with_finite_losses(model_dirs, train_file, tmp_path):
    """bf16 mixed precision (CPU autocast here) with the teacher in bf16: losses stay finite and close to fp32's."""
    fp32 = run(config(model_dirs, train_file, tmp_path / "fp32", max_steps=2)).summary
    bf16 = run(config(model_dirs, train_file, tmp_path / "bf16", max_steps=2, bf16=True)).summary
    for ours, reference in zip(bf16["history"], fp32["history"]):
        assert math.isfinite(ours["train/loss"])
        assert ours["train/loss"] == pytest.approx(reference["train/loss"], rel=0.05)
