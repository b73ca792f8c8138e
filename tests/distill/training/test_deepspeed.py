"""Real 2-process DeepSpeed runs on CPU (gloo): ZeRO-2 and ZeRO-3 training, exact resume after ``kill -9`` (during
training and during a checkpoint save), two nodes on loopback, a hidden-state feature loss with a projector under
ZeRO-3, held-out evaluation under ZeRO-3 with an eval set that does not divide, and ``distill export`` from ZeRO-3
shards.

Each run takes tens of seconds on 2 cores (mostly imports and process-group start); the first DeepSpeed run on a
clean machine also JIT-builds a small comm op once (cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, addition_rows, free_port, slowed_steps, write_jsonl

pytest.importorskip("deepspeed")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
STEPS = 4
FEATURE_TERMS = "{forward_kl: 1, hidden_mse: 0.5}"  # student (32 wide) narrower than teacher (64): a projector


def train_args(model_dirs, train_file: Path, out: Path, *extra: str, terms: str = "{forward_kl: 0.7, ce: 0.3}"):
    return [
        "--output_dir",
        str(out),
        "--max_steps",
        str(STEPS),
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--eval_steps",
        "null",
        "--report_to",
        "[none]",
        "--per_device_train_batch_size",
        "4",
        "--save_steps",
        "2",
        "--save_total_limit",
        "null",
        "--model.teacher",
        str(model_dirs["teacher"]),
        "--model.student",
        str(model_dirs["student"]),
        "--data.train_file",
        str(train_file),
        "--data.eval_fraction",
        "0",
        "--loss.terms",
        terms,
        "--loss.chunk_size",
        "7",
        *extra,
    ]


def launch_command(config: str, args: list[str], *launcher_args: str) -> list[str]:
    return [
        "accelerate",
        "launch",
        "--config_file",
        f"launch/{config}",
        "--num_processes",
        "2",
        *launcher_args,
        "-m",
        "distill",
        "train",
        *args,
    ]


def run(config: str, args: list[str], *launcher_args: str) -> subprocess.CompletedProcess:
    port = ["--main_process_port", str(free_port())] if "--main_process_port" not in launcher_args else []
    result = subprocess.run(
        launch_command(config, args, *port, *launcher_args),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def popen(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A background run whose stderr goes to ``log``: an unread pipe would fill up and block the ranks."""
    with open(log, "w") as stderr:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env or ENV, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )


def start(config: str, args: list[str], log: Path) -> subprocess.Popen:
    """A run to be killed mid-way: each step is slowed (tests/slow_steps) so the kill lands before the run ends."""
    return popen(launch_command(config, args, "--main_process_port", str(free_port())), log, env=slowed_steps(ENV, 0.3))


def kill_when(process: subprocess.Popen, path: Path, poll: float, log: Path) -> None:
    deadline = time.time() + 400
    while not path.exists():
        assert process.poll() is None, f"run ended before {path.name} appeared: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(poll)
    # torchrun starts each rank in a session of its own: kill the ranks by pid, then the launcher, as a node
    # failure would (killing the launcher's process group alone leaves the ranks running).
    ranks = psutil.Process(process.pid).children(recursive=True)
    for rank in ranks:
        rank.send_signal(signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    psutil.wait_procs(ranks, timeout=60)


def logged_losses(out: Path) -> dict[int, float]:
    """Per-step training loss; after a resume the re-run steps overwrite the earlier entries."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            losses[record["step"]] = record["train/loss"]
    return losses


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Same per-step losses and the same final parameters (max abs diff <= 1e-6, fp32 on CPU)."""
    want, got = logged_losses(reference), logged_losses(resumed)
    assert got.keys() == want.keys() == set(range(1, STEPS + 1))
    for step, value in want.items():
        assert got[step] == pytest.approx(value, abs=1e-6), step
    ref_weights = load_file(str(reference / "final" / "model.safetensors"))
    new_weights = load_file(str(resumed / "final" / "model.safetensors"))
    assert ref_weights.keys() == new_weights.keys()
    for name, tensor in ref_weights.items():
        assert (new_weights[name] - tensor).abs().max().item() <= 1e-6, name


def copy_checkpoint(source: Path, step: int, target: Path) -> None:
    """A run directory holding only ``checkpoint-<step>`` and the metrics logged up to it: a run stopped there."""
    target.mkdir()
    shutil.copytree(source / f"checkpoint-{step}", target / f"checkpoint-{step}")
    kept = [line for line in (source / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (target / "metrics.jsonl").write_text("\n".join(kept) + "\n")


@pytest.fixture(scope="module")
def zero3_reference(model_dirs, train_file, tmp_path_factory) -> Path:
    """An uninterrupted ZeRO-3 run with a hidden-state loss through a projector, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("zero3") / "reference"
    result = run("zero3.yaml", train_args(model_dirs, train_file, out, terms=FEATURE_TERMS))
    (out.parent / "launch.log").write_text(result.stderr)
    return out


@pytest.mark.slow
def test_zero2_kill_9_during_training_then_resume_is_exact(model_dirs, train_file, tmp_path):
    reference = tmp_path / "reference"
    run("zero2.yaml", train_args(model_dirs, train_file, reference))
    shards = sorted(p.name for p in (reference / "checkpoint-2" / "pytorch_model").iterdir())
    assert shards == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ], shards  # ZeRO-2: optimizer partitioned
    assert {p.name for p in (reference / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }

    out = tmp_path / "killed"
    args = train_args(model_dirs, train_file, out, "--save_steps", "1")
    log = tmp_path / "killed.log"
    kill_when(start("zero2.yaml", args, log), out / "checkpoint-2", poll=0.05, log=log)
    assert not (out / "final").exists()
    resumed = run("zero2.yaml", [*args, "--resume", "auto"])
    assert f"resumed from {out}/checkpoint-" in resumed.stderr
    assert_same_run(reference, out)


@pytest.mark.slow
def test_zero3_feature_loss_shards_teacher_and_student(zero3_reference):
    # The teacher is partitioned too: each of the 2 ranks holds about half of it, not a full copy.
    held = re.findall(
        r"teacher sharded by ZeRO-3: this rank holds (\d+) of (\d+) parameters",
        (zero3_reference.parent / "launch.log").read_text(),
    )
    assert len(held) == 2 and all(int(part) < 0.6 * int(total) for part, total in held), held
    checkpoint = zero3_reference / "checkpoint-4"
    names = sorted(p.name for p in (checkpoint / "pytorch_model").iterdir())
    assert names == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    # The projector is a parameter of the prepared module: its shards are in the model state of each rank.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    projectors = {k: v for k, v in state.items() if k.startswith("features.projectors.")}
    assert projectors and all(v.shape[-1] in (32, 64) for v in projectors.values()), sorted(state)[:5]
    losses = logged_losses(zero3_reference)
    assert len(losses) == STEPS and all(v > 0 for v in losses.values())
    hidden = [json.loads(line) for line in (zero3_reference / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/hidden_mse"] > 0 for r in hidden)
    assert (zero3_reference / "final" / "tokenizer.json").is_file()
    assert not any(k.startswith("features.") for k in load_file(str(zero3_reference / "final" / "model.safetensors")))


@pytest.mark.slow
def test_zero3_kill_9_during_checkpoint_save_resumes_from_previous(model_dirs, train_file, zero3_reference, tmp_path):
    out = tmp_path / "killed"
    args = train_args(model_dirs, train_file, out, "--save_steps", "1", terms=FEATURE_TERMS)
    log = tmp_path / "killed.log"
    kill_when(start("zero3.yaml", args, log), out / ".checkpoint-3.tmp", poll=0.01, log=log)
    assert (out / "checkpoint-2").is_dir() and not (out / "final").exists()
    half_written = (out / ".checkpoint-3.tmp").exists()
    resumed = run("zero3.yaml", [*args, "--resume", "auto"])
    if half_written:  # the kill landed inside the save (it nearly always does: the save takes a while)
        assert f"ignoring unfinished checkpoint save {out}/.checkpoint-3.tmp" in resumed.stderr
        assert f"resumed from {out}/checkpoint-2" in resumed.stderr
    assert_same_run(zero3_reference, out)


@pytest.mark.slow
def test_two_nodes_on_loopback_resume_a_zero3_checkpoint_exactly(model_dirs, train_file, zero3_reference, tmp_path):
    """Two "nodes" of one process each, started by launch/slurm_node.sh (what launch/slurm.sbatch runs on every
    node): two ``accelerate launch`` with machine ranks 0 and 1 and the standard multi-node launcher."""
    out = tmp_path / "two_nodes"
    copy_checkpoint(zero3_reference, 2, out)
    args = [*train_args(model_dirs, train_file, out, terms=FEATURE_TERMS), "--resume", "auto"]
    port = str(free_port())
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [
        popen(
            ["bash", "launch/slurm_node.sh", *args],
            logs[rank],
            env={
                **ENV,
                "SLURM_NNODES": "2",
                "SLURM_NODEID": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "PROCS_PER_NODE": "1",
            },
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        node.wait(timeout=600)
    errors = [log.read_text() for log in logs]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert f"resumed from {out}/checkpoint-2" in errors[0]
    assert_same_run(zero3_reference, out)


@pytest.mark.slow
def test_export_consolidates_zero3_shards(zero3_reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "exported"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "export",
            "--checkpoint",
            str(zero3_reference / "checkpoint-4"),
            "--output_dir",
            str(target),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(target)
    AutoTokenizer.from_pretrained(target)
    final = load_file(str(zero3_reference / "final" / "model.safetensors"))
    exported = model.state_dict()
    for name, tensor in final.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "export",
            "--checkpoint",
            str(zero3_reference / "checkpoint-4"),
            "--output_dir",
            str(target),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2 and "output_dir" in again.stderr  # never overwrites


@pytest.mark.slow
def test_sigusr1_to_the_launcher_saves_on_every_rank_and_stops(model_dirs, train_file, tmp_path):
    """Slurm's `--signal=USR1@120` reaches the launcher only (torchrun starts ranks in sessions of their own);
    launch/slurm_node.sh makes it forward SIGUSR1, and the ranks save together and stop with exit code 75."""
    out = tmp_path / "preempted"
    args = train_args(model_dirs, train_file, out, "--max_steps", "400", "--save_steps", "1000")
    log = tmp_path / "node.log"
    node = popen(
        ["bash", "launch/slurm_node.sh", *args],
        log,
        env=slowed_steps(
            {
                **ENV,
                "SLURM_NNODES": "1",
                "SLURM_NODEID": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
                "PROCS_PER_NODE": "2",
                "ACCELERATE_CONFIG": "launch/zero2.yaml",
            },
            0.05,
        ),
    )
    deadline = time.time() + 400
    while not (out / "metrics.jsonl").exists():
        assert node.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    node.send_signal(signal.SIGUSR1)  # the launcher only, as Slurm does
    node.wait(timeout=600)
    stderr = log.read_text()
    assert "stop signal received: checkpoint saved" in stderr, stderr[-3000:]
    # `accelerate launch` alone would exit 1 (an uncaught SignalException); slurm_node.sh's wrapper exits 75.
    assert node.returncode == 75 and "got signal: 10" in stderr, stderr[-3000:]
    saved = [p for p in out.glob("checkpoint-*")]
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < 400
    from distill.training.checkpoint import validate

    assert validate(saved[0]) is None and not (out / "final").exists()
    assert {p.name for p in saved[0].glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}


def slurm_job_id() -> int:
    """A SLURM_JOB_ID for which launch/slurm.sbatch picks a free port (20000 + id % 20000)."""
    while True:
        port = free_port()
        if 20000 <= port < 40000:
            return port - 20000


@pytest.mark.slow
def test_sigterm_to_a_zero3_job_exits_75_requeues_and_resumes(model_dirs, train_file, tmp_path):
    """launch/slurm.sbatch end to end on one "node" of 2 ZeRO-3 ranks, srun and scontrol faked on PATH: SIGTERM to
    the node's launcher mid-training (as Slurm signals a step) makes every rank save, the launcher, srun and the job
    exit 75 and the job requeue itself; the requeued job (`--resume auto`) continues from that checkpoint to the
    end and does not requeue again."""
    out = tmp_path / "job"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'export SLURM_NNODES=1 SLURM_NODEID=0\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [[ "$1" == show ]]; then echo 127.0.0.1; else echo "$@" >> {requeued}; fi\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    # slurm.sbatch adds --output_dir "$OUTPUT_DIR" --resume auto
    args = train_args(model_dirs, train_file, out, "--max_steps", "8", "--save_steps", "1000")[2:]

    def job_env(slow: float) -> dict[str, str]:
        job_id = slurm_job_id()
        return slowed_steps(
            {
                **ENV,
                "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}",
                "OUTPUT_DIR": str(out),
                "SLURM_JOB_ID": str(job_id),
                "SLURM_JOB_NODELIST": "localhost",
                "SLURM_GPUS_ON_NODE": "2",
                "ACCELERATE_CONFIG": "launch/zero3.yaml",
                "PYTHON": sys.executable,
            },
            slow,
        )

    log = tmp_path / "job1.log"
    env = job_env(0.5)
    job = popen(["bash", "launch/slurm.sbatch", *args], log, env=env)
    deadline = time.time() + 400
    while not (out / "metrics.jsonl").exists():
        assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    (launcher,) = psutil.Process(job.pid).children()  # the srun step: slurm_node.sh exec'd into the launcher
    launcher.send_signal(signal.SIGTERM)
    job.wait(timeout=600)
    stderr = log.read_text()
    assert job.returncode == 75, stderr[-3000:]
    assert "got signal: 15" in stderr and "every rank saved a checkpoint: exit 75" in stderr
    assert requeued.read_text().split() == ["requeue", env["SLURM_JOB_ID"]]
    saved = (out / "latest").read_text().strip()
    step = int(saved.split("-")[-1])
    assert 0 < step < 8 and not (out / "final").exists()
    requeued.unlink()

    log = tmp_path / "job2.log"
    with open(log, "w") as stderr_file:
        again = subprocess.run(
            ["bash", "launch/slurm.sbatch", *args],
            cwd=REPO_ROOT,
            env=job_env(0),
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            timeout=600,
            check=False,
        )
    stderr = log.read_text()
    assert again.returncode == 0, stderr[-3000:]
    assert f"resumed from {out}/checkpoint-{step}" in stderr and (out / "final").is_dir()
    assert not requeued.exists() and set(logged_losses(out)) == set(range(1, 9))


@pytest.mark.slow
def test_zero3_with_cpu_offload_trains_like_zero3(model_dirs, train_file, zero3_reference, tmp_path):
    """launch/zero3_offload.yaml (optimizer states and parameters in CPU memory, torch AdamW on them)."""
    out = tmp_path / "offload"
    run("zero3_offload.yaml", train_args(model_dirs, train_file, out, terms=FEATURE_TERMS))
    assert_same_run(zero3_reference, out)


@pytest.mark.slow
def test_zero3_evaluates_an_eval_set_that_does_not_divide(model_dirs, train_file, tmp_path):
    """Eval on under ZeRO-3 with 2 processes, 5 eval rows and eval batch 2: rank 0 has 2 batches, rank 1 one and an
    uncounted one. Each forward and head gather is a collective, so unequal counts hung the first evaluation; the
    final figures equal a one-process full-logit evaluation of the exported student."""
    from distill.data.datasets import DataSettings, build_datasets, collate
    from kd_core.pretrained import load_causal_lm, load_tokenizer
    from tests.distill.evaluation.test_evaluator import full_logit_sums

    eval_file = write_jsonl(tmp_path / "eval.jsonl", addition_rows(5))
    out = tmp_path / "run"
    args = train_args(
        model_dirs,
        train_file,
        out,
        "--eval_steps",
        "2",
        "--data.eval_file",
        str(eval_file),
        "--per_device_eval_batch_size",
        "2",
    )
    command = launch_command("zero3.yaml", args, "--main_process_port", str(free_port()))
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/kl" in r]
    assert [r["step"] for r in evals] == [2, STEPS]

    tokenizer = load_tokenizer(model_dirs["student"], "model")
    _, eval_set = build_datasets(DataSettings(train_file=str(train_file), eval_file=str(eval_file)), tokenizer, 42)
    student = load_causal_lm(out / "final", "model").eval()
    teacher = load_causal_lm(model_dirs["teacher"], "teacher").eval()
    batches = [collate([eval_set[i] for i in range(j, min(j + 2, 5))], tokenizer.pad_token_id) for j in (0, 2, 4)]
    kl, agreement, ce, tokens = full_logit_sums(student, teacher, batches, len(tokenizer)).tolist()
    final = json.loads((out / "summary.json").read_text())["final_eval"]
    assert final["eval/tokens"] == evals[-1]["eval/tokens"] == tokens
    assert final["eval/loss"] == pytest.approx(ce / tokens, rel=1e-4)
    assert final["eval/kl"] == pytest.approx(kl / tokens, rel=1e-3)
    assert final["eval/top1_agreement"] == pytest.approx(agreement / tokens, abs=1e-9)


def test_zero3_with_gradient_checkpointing_trains_like_zero3(model_dirs, train_file, zero3_reference, tmp_path):
    """model.gradient_checkpointing under ZeRO-3 (partitioned weights gathered again for the recomputation): the
    same losses and final weights as the run that keeps its activations."""
    out = tmp_path / "checkpointing"
    run(
        "zero3.yaml",
        train_args(model_dirs, train_file, out, "--model.gradient_checkpointing", "true", terms=FEATURE_TERMS),
    )
    assert_same_run(zero3_reference, out)
