"""Every shipped launch config parses and names files that exist; a launch config naming a missing DeepSpeed file
fails with a one-line error before anything trains or is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT

LAUNCH = REPO_ROOT / "launch"
CONFIGS = sorted(LAUNCH.glob("*.yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_the_expected_configs_ship():
    names = {p.name for p in CONFIGS}
    assert {"single.yaml", "ddp.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "multinode.yaml"} <= names
    assert (LAUNCH / "slurm.sbatch").is_file() and (LAUNCH / "slurm_node.sh").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_parses_and_names_existing_files(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cluster = load_config_from_file(str(path))  # accelerate's own reader: unknown keys raise
    raw = yaml.safe_load(path.read_text())
    assert cluster.distributed_type.value == raw["distributed_type"]
    if raw["distributed_type"] != "DEEPSPEED":
        return
    ds_file = REPO_ROOT / raw["deepspeed_config"]["deepspeed_config_file"]
    assert ds_file.is_file(), f"{path.name} names {ds_file}, which does not exist"
    ds = json.loads(ds_file.read_text())
    stage = ds["zero_optimization"]["stage"]
    assert f"zero{stage}" in path.name or path.name == "multinode.yaml"
    # accelerate fills these from the training run; a hard-coded value would silently disagree with the config.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", (ds_file.name, key)
    if raw["num_machines"] > 1:
        assert raw["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"  # no ssh/pdsh needed


def test_offload_config_offloads_optimizer_and_parameters():
    ds = json.loads((LAUNCH / "ds_zero3_offload.json").read_text())["zero_optimization"]
    assert ds["offload_optimizer"]["device"] == ds["offload_param"]["device"] == "cpu"


def test_shell_scripts_parse():
    for script in ("slurm.sbatch", "slurm_node.sh"):
        result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_missing_deepspeed_file_is_a_clear_error_before_training(model_dirs, tmp_path):
    config = yaml.safe_load((LAUNCH / "zero3.yaml").read_text())
    config["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "missing_ds.json")
    config["num_processes"] = 1
    launch_config = tmp_path / "broken.yaml"
    launch_config.write_text(yaml.safe_dump(config))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    out = tmp_path / "run"
    result = subprocess.run(
        [
            "accelerate",
            "launch",
            "--config_file",
            str(launch_config),
            "-m",
            "distill",
            "train",
            "--output_dir",
            str(out),
            "--model.teacher",
            str(model_dirs["teacher"]),
            "--model.student",
            str(model_dirs["student"]),
            "--data.train_file",
            str(data),
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert (
        f"error: deepspeed_config_file: {tmp_path / 'missing_ds.json'} (named by the accelerate launch config) "
        "does not exist" in result.stderr
    ), result.stderr[-3000:]
    assert not out.exists()


def test_distill_export_is_registered():
    from kd_core.commands import command_module
    from kd_recipes.cli import DISTILL_COMMANDS

    assert callable(command_module(DISTILL_COMMANDS, "export").main)
    help_text = subprocess.run(
        [sys.executable, "-m", "distill", "export", "--help"], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert help_text.returncode == 0 and "--checkpoint" in help_text.stdout


def test_sigterm_to_the_single_process_launcher_reaches_the_trainer_and_exits_75(model_dirs, train_file, tmp_path):
    """`python -m distill.training.launch` with launch/single.yaml (accelerate's simple launcher, which only waits
    on its child): SIGTERM to the launcher alone is forwarded, the trainer saves and exits 75, and so does the
    launcher; `--resume auto` then finishes the run."""
    import signal
    import time

    from tests.conftest import slowed_steps

    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "distill.training.launch",
        "--config_file",
        "launch/single.yaml",
        "-m",
        "distill",
        "train",
        "--output_dir",
        str(out),
        "--max_steps",
        "40",
        "--per_device_train_batch_size",
        "4",
        "--save_steps",
        "1000",
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
    ]
    log = tmp_path / "launch.log"
    with open(log, "w") as stderr:
        launcher = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=slowed_steps(ENV, 0.3),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists():
        assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)  # the launcher only, not its process group
    assert launcher.wait(timeout=300) == 75, log.read_text()[-3000:]
    assert "the process saved a checkpoint: exit 75" in log.read_text()
    step = int((out / "latest").read_text().strip().split("-")[-1])
    assert 0 < step < 40 and not (out / "final").exists()
    resumed = subprocess.run(
        [*command, "--resume", "auto"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoint-{step}" in resumed.stderr and (out / "final").is_dir()
