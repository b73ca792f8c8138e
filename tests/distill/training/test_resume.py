"""Resume in one process: a half-written checkpoint is skipped for the previous one, an incompatible checkpoint is
refused naming what differs, a different process count continues from the right sample, and ``distill export``
reads single-process checkpoints."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from distill.data.batching import BatchStream
from distill.training import checkpoint as ckpt
from distill.training.train import Distiller, TrainConfig, run
from kd_core.config import ConfigError, from_dict
from tests.conftest import REPO_ROOT, free_port

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def config(model_dirs, train_file, out, **overrides) -> TrainConfig:
    tree = {
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "save_steps": 1,
        "save_total_limit": None,
        "eval_steps": None,
        "logging_steps": 1,
        "report_to": ["none"],
        "model": {"teacher": str(model_dirs["teacher"]), "student": str(model_dirs["student"])},
        "data": {"train_file": str(train_file), "eval_fraction": 0.0},
        "loss": {"terms": {"forward_kl": 0.7, "ce": 0.3}},
    }
    tree.update(overrides)
    return from_dict(TrainConfig, tree)


@pytest.fixture(scope="module")
def finished_run(model_dirs, train_file, tmp_path_factory):
    """Three steps in one process through launch/single.yaml, a checkpoint after each."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = subprocess.run(
        [
            "accelerate",
            "launch",
            "--config_file",
            "launch/single.yaml",
            "-m",
            "distill",
            "train",
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-3",
            "--save_steps",
            "1",
            "--save_total_limit",
            "null",
            "--eval_steps",
            "null",
            "--logging_steps",
            "1",
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
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_checkpoint_is_self_contained(finished_run):
    checkpoint = finished_run / "checkpoint-3"
    assert ckpt.validate(checkpoint) is None
    manifest = json.loads((checkpoint / ckpt.MANIFEST_FILE).read_text())["files"]
    for name in (
        "config.yaml",
        "student/config.json",
        "student/tokenizer.json",
        "random_states_0.pkl",
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        ckpt.STATE_FILE,
    ):
        assert name in manifest, name
    state = ckpt.read_state(checkpoint)
    assert state["step"] == 3 and state["samples_consumed"] == 12 and state["world_size"] == 1


def test_half_written_checkpoint_is_skipped_for_the_previous(finished_run, model_dirs, train_file, tmp_path, caplog):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "final")
    truncated = out / "checkpoint-3" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])  # a crash or a full disk mid-write
    (out / ".checkpoint-4.tmp").mkdir()  # and a save that never finished
    with caplog.at_level(logging.WARNING):
        found = ckpt.find_resume_checkpoint(out)
    assert found == out / "checkpoint-2"
    assert f"skipping invalid checkpoint {out / 'checkpoint-3'}: model.safetensors has 100 bytes" in caplog.text
    assert f"ignoring unfinished checkpoint save {out / '.checkpoint-4.tmp'}" in caplog.text

    distiller = Distiller(config(model_dirs, train_file, out, resume="auto"))
    distiller.resume()
    assert distiller.step == 2 and distiller.stream.samples_consumed == 8


def test_incompatible_checkpoint_names_what_differs(finished_run, model_dirs, train_file, tmp_path, tokenizer):
    from distill.student.tiny import tiny_llama

    wider = tmp_path / "wider_student"
    tiny_llama(len(tokenizer), hidden_size=48, num_layers=2).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    checkpoint = finished_run / "checkpoint-2"
    other_model = config(
        model_dirs,
        train_file,
        tmp_path / "a",
        resume=str(checkpoint),
        model={"teacher": str(model_dirs["teacher"]), "student": str(wider)},
    )
    with pytest.raises(ConfigError, match=r"different student config \(.*hidden_size: checkpoint 32 vs now 48"):
        Distiller(other_model).resume()
    other_loss = config(
        model_dirs, train_file, tmp_path / "b", resume=str(checkpoint), loss={"terms": {"reverse_kl": 1.0}}
    )
    with pytest.raises(ConfigError, match=r"different loss terms \(.*forward_kl: checkpoint 0.7 vs now None"):
        Distiller(other_loss).resume()
    with pytest.raises(ConfigError, match="resume: cannot use checkpoint .*not a directory"):
        Distiller(config(model_dirs, train_file, tmp_path / "c", resume=str(tmp_path / "nope"))).resume()


def test_different_process_count_continues_at_the_right_sample(caplog):
    saved = BatchStream(40, batch_size=4, world_size=2, rank=0, seed=1)
    for _ in range(3):
        saved.next_indices()  # 3 steps x 8 samples
    assert saved.samples_consumed == 24
    for world, expected in ((1, 24), (4, 16)):  # 4 x 4 = 16 per step: back to the last whole global batch
        resumed = BatchStream(40, batch_size=4, world_size=world, rank=0, seed=1)
        with caplog.at_level(logging.WARNING):
            resumed.resume_at(saved.samples_consumed, saved_world_size=2)
        assert resumed.samples_consumed == expected
        assert f"resuming with {world} processes from a checkpoint written by 2" in caplog.text
    # With one process the continuation is exactly the samples the two ranks would have taken next.
    one = BatchStream(40, batch_size=4, world_size=1, rank=0, seed=1)
    one.resume_at(24, saved_world_size=2)
    ranks = [BatchStream(40, 4, 2, r, 1, samples_consumed=24).next_indices() for r in (0, 1)]
    assert one.next_indices() + one.next_indices() == ranks[0] + ranks[1]


def test_export_of_a_single_process_checkpoint_matches_final(finished_run, tmp_path):
    from transformers import AutoModelForCausalLM

    target = tmp_path / "exported"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "export",
            "--checkpoint",
            str(finished_run / "checkpoint-3"),
            "--output-dir",
            str(target),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(target).state_dict()
    for name, tensor in load_file(str(finished_run / "final" / "model.safetensors")).items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    half = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "export",
            "--checkpoint",
            str(finished_run / "checkpoint-3"),
            "--output-dir",
            str(tmp_path / "bf16"),
            "--dtype",
            "bfloat16",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert half.returncode == 0, half.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "export",
            "--checkpoint",
            str(tmp_path / "missing"),
            "--output-dir",
            str(tmp_path / "y"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "error: checkpoint: cannot use" in bad.stderr
    assert not (tmp_path / "y").exists()


def test_resume_with_more_processes_continues_at_the_same_sample(finished_run, model_dirs, train_file, tmp_path):
    """A one-process checkpoint resumed by a 2-process DDP run (launch/ddp.yaml): same global sample, a warning."""
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(finished_run / "checkpoint-2", out / "checkpoint-2")
    result = subprocess.run(
        [
            "accelerate",
            "launch",
            "--config_file",
            "launch/ddp.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "-m",
            "distill",
            "train",
            "--output_dir",
            str(out),
            "--resume",
            "auto",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-3",
            "--save_steps",
            "1",
            "--eval_steps",
            "null",
            "--logging_steps",
            "1",
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
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming with 2 processes from a checkpoint written by 1: continuing at epoch 0, sample 8" in result.stderr
    state = ckpt.read_state(out / "checkpoint-3")
    assert state["world_size"] == 2 and state["samples_consumed"] == 8 + 8  # one step of 2 x 4 samples


def test_export_of_a_lora_checkpoint_matches_the_trainers_export(model_dirs, train_file, tmp_path):
    """The LoRA export (what the trainer writes to final/ at the end) is self-consistent: the base student plus the
    exported adapter, merged by peft, gives the exported merged model's logits, the adapter really changed the
    model, and exporting the same checkpoint again offline gives identical weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distill.training.export import export_checkpoint

    out = tmp_path / "lora_run"
    cfg = config(
        model_dirs, train_file, out, max_steps=2, lora={"enabled": True, "r": 4, "alpha": 8}, lora_export="both"
    )
    run(cfg)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(out / "final").eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).eval()
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "final" / "adapter").merge_and_unload().eval()
        torch.testing.assert_close(adapted(ids).logits, merged_logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base_logits, merged_logits)
    again = export_checkpoint(out / "checkpoint-2", tmp_path / "exported")
    exported = load_file(str(again / "model.safetensors"))
    for name, tensor in load_file(str(out / "final" / "model.safetensors")).items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)


def flip_a_byte(path) -> None:
    """Corruption that keeps the size: only the manifest's content hash can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoint_corrupted_in_place_is_skipped_and_the_resumed_run_is_exact(
    finished_run, model_dirs, train_file, tmp_path, caplog
):
    import shutil

    out = tmp_path / "out"  # the run as it was when stopped after its third checkpoint
    out.mkdir()
    for name in ("checkpoint-2", "checkpoint-3"):
        shutil.copytree(finished_run / name, out / name)
    entry = json.loads((out / "checkpoint-3" / ckpt.MANIFEST_FILE).read_text())["files"]["model.safetensors"]
    assert set(entry) == {"size", "xxh3_128"}
    flip_a_byte(out / "checkpoint-3" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resume_checkpoint(out) == out / "checkpoint-2"
    assert (
        f"skipping invalid checkpoint {out / 'checkpoint-3'}: model.safetensors does not match its xxh3_128 "
        "hash in manifest.json"
    ) in caplog.text

    bad = tmp_path / "bad-checkpoint-3"
    shutil.copytree(out / "checkpoint-3", bad)
    run(config(model_dirs, train_file, out, resume="auto"))  # continues from checkpoint-2
    reference = load_file(str(finished_run / "final" / "model.safetensors"))
    resumed = load_file(str(out / "final" / "model.safetensors"))
    for name, tensor in reference.items():
        assert (resumed[name] - tensor).abs().max().item() <= 1e-6, name

    # Named explicitly, by `--resume PATH` or `distill export`, the corrupt checkpoint is refused: one line, exit 2.
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "train",
            "--output_dir",
            str(tmp_path / "other"),
            "--max_steps",
            "3",
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
            "--resume",
            str(bad),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "export",
            "--checkpoint",
            str(bad),
            "--output-dir",
            str(tmp_path / "exported"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    for result, prefix in (
        (train, f"error: resume: cannot use checkpoint {bad}"),
        (export, f"error: checkpoint: cannot use {bad}"),
    ):
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"{prefix}: model.safetensors does not match its xxh3_128 hash in manifest.json "
            "(corrupted in place; same size)"
        ], result.stderr[-3000:]
    assert not (tmp_path / "exported").exists()


def test_checkpoint_of_the_earlier_version_sizes_only_still_resumes(
    finished_run, model_dirs, train_file, tmp_path, caplog
):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-3")
    manifest = out / "checkpoint-2" / ckpt.MANIFEST_FILE
    files = json.loads(manifest.read_text())["files"]
    manifest.write_text(json.dumps({"files": {name: entry["size"] for name, entry in files.items()}}, indent=1))
    with caplog.at_level(logging.WARNING):
        assert ckpt.validate(out / "checkpoint-2") is None
        assert ckpt.find_resume_checkpoint(out) == out / "checkpoint-2"
    assert "checkpoint" not in caplog.text  # nothing alarming
    distiller = Distiller(config(model_dirs, train_file, out, resume="auto"))
    distiller.resume()
    assert distiller.step == 2 and distiller.stream.samples_consumed == 8
    # A truncated file is still caught on sizes alone.
    (out / "checkpoint-2" / "scheduler.bin").write_bytes(b"")
    assert "scheduler.bin has 0 bytes" in ckpt.validate(out / "checkpoint-2")


def test_export_killed_with_sigkill_then_rerun_equals_an_uninterrupted_export(finished_run, tmp_path):
    """``distill export`` killed while it saves and just before it publishes: no model directory (or temporary one)
    is left, and the rerun writes the same files as an uninterrupted export."""
    from tests.conftest import kill_9, tree_digest

    target = tmp_path / "exported"
    command = [
        sys.executable,
        "-m",
        "distill",
        "export",
        "--checkpoint",
        str(finished_run / "checkpoint-3"),
        "--output-dir",
        str(target),
    ]
    reference = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = tree_digest(target)
    target.rename(tmp_path / "reference")
    # The tiny student saves in milliseconds: this kill may come too late (the run then finished), which is allowed.
    if not kill_9(command, ENV, until=lambda: any(tmp_path.glob(f".{target.name}.*.tmp"))):
        target.rename(tmp_path / "finished")
    assert kill_9(command, ENV, point=f"publish:{target.name}")  # every file written, not yet renamed into place
    assert not target.exists() and any(tmp_path.glob(f".{target.name}.*.tmp"))
    final = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert tree_digest(target) == expected  # same files, same bytes
    assert not list(tmp_path.rglob("*.tmp"))
