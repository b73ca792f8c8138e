"""On-policy distillation (``on_policy``): settings refused up front, prompts-only data, sampled micro-batches (the
prompt kept, the completion cut after EOS, padding never counted), the loss on sampled tokens against a direct
reference, the sampler's state round trip, replay, and exact resume after ``kill -9`` in one process and in a
2-process ZeRO-3 run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distill.data.datasets import IGNORE_INDEX, DataSettings, tokenize_example, tokenize_records
from distill.training.on_policy import OFF_POLICY, REPLAY, STUDENT, TEACHER, OnPolicySettings, Sampler
from distill.training.train import Distiller, TrainConfig
from kd_core.config import ConfigError, from_dict
from kd_core.generation import encode_prompt
from tests.conftest import REPO_ROOT, addition_rows, free_port, slowed_steps, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def config(model_dirs, train_file, out, on_policy=None, **overrides) -> TrainConfig:
    tree = {
        "output_dir": str(out),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "save_steps": 1,
        "save_total_limit": None,
        "eval_steps": None,
        "logging_steps": 1,
        "report_to": ["none"],
        "model": {"teacher": str(model_dirs["teacher"]), "student": str(model_dirs["student"])},
        "data": {"train_file": str(train_file), "eval_fraction": 0.0},
        "loss": {"terms": {"reverse_kl": 1.0}},
        "on_policy": {"student_fraction": 1.0, "max_new_tokens": 12, **(on_policy or {})},
    }
    tree.update(overrides)
    return from_dict(TrainConfig, tree)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(
        tmp_path_factory.mktemp("prompts") / "prompts.jsonl", [{"prompt": row["prompt"]} for row in addition_rows(48)]
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"student_fraction": 0.7, "teacher_fraction": 0.5},
            r"on_policy: student_fraction \+ teacher_fraction: expected "
            r"at most 1, got 0.7 \+ 0.5",
        ),
        ({"max_new_tokens": 0}, "on_policy: max_new_tokens: expected >= 1, got 0"),
        ({"temperature": -1}, r"on_policy: temperature: expected >= 0"),
        ({"top_p": 0}, r"on_policy: top_p: expected a number in \(0, 1\], got 0"),
        ({"top_k": -2}, r"on_policy: top_k: expected >= 0"),
        ({"replay_ratio": 2}, r"on_policy: replay_ratio: expected a number in \[0, 1\], got 2"),
        (
            {"generation_kwargs": {"min_pp": 0.1}},
            "on_policy: generation_kwargs.min_pp: not a transformers GenerationConfig",
        ),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_field(settings, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(OnPolicySettings, settings, "on_policy")


def test_prompts_only_data_with_off_policy_batches_exits_2_and_writes_nothing(model_dirs, prompts_file, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "train",
            "--output_dir",
            str(out),
            "--report_to",
            "[none]",
            "--model.teacher",
            str(model_dirs["teacher"]),
            "--model.student",
            str(model_dirs["student"]),
            "--data.train_file",
            str(prompts_file),
            "--loss.terms",
            "{reverse_kl: 1}",
            "--on_policy.student_fraction",
            "0.5",
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        f"data.train_file: {prompts_file} row 0 is a prompt without a completion; prompts-only data needs every "
        "micro-batch sampled (on_policy.student_fraction + teacher_fraction = 1, now 0.5 + 0.0)"
    ) in result.stderr
    assert not out.exists()


def test_settings_that_cannot_train_on_samples_are_refused(model_dirs, train_file, tmp_path):
    with pytest.raises(ConfigError, match="loss.terms: on the student's own samples `ce` is off"):
        config(model_dirs, train_file, tmp_path, loss={"terms": {"ce": 1.0}})
    with pytest.raises(ConfigError, match="model.teacher: on-policy training .* needs a teacher"):
        config(
            model_dirs,
            train_file,
            tmp_path,
            model={"student": str(model_dirs["student"])},
            loss={"terms": {"ce": 1.0}},
            on_policy={"student_fraction": 0.0, "teacher_fraction": 1.0},
        )
    with pytest.raises(ConfigError, match="loss.teacher_store: holds targets for the dataset's tokens only"):
        config(
            model_dirs,
            train_file,
            tmp_path,
            model={"student": str(model_dirs["student"])},
            loss={"terms": {"forward_kl": 1.0}, "teacher_store": str(tmp_path)},
        )


def test_prompt_shapes_give_the_generation_prompt(tokenizer):
    prompt = "What is 3 plus 4?"
    wanted = encode_prompt(tokenizer, prompt)  # what generation is given
    alone = tokenize_example({"prompt": prompt}, "prompt", tokenizer, 512, True)
    waiting = tokenize_example({"messages": [{"role": "user", "content": prompt}]}, "messages", tokenizer, 512, True)
    paired = tokenize_example({"prompt": prompt, "completion": "7"}, "prompt_completion", tokenizer, 512, True)
    for example in (alone, waiting):
        assert example["input_ids"] == wanted and example["prompt_length"] == len(wanted)
        assert set(example["labels"]) == {IGNORE_INDEX} and not example["has_completion"]
    assert paired["input_ids"][: paired["prompt_length"]] == wanted and paired["has_completion"]
    assert set(paired["labels"][: paired["prompt_length"]]) == {IGNORE_INDEX}
    assert paired["labels"][paired["prompt_length"]] != IGNORE_INDEX
    dataset = tokenize_records([{"prompt": prompt}], tokenizer, DataSettings(), "p.jsonl")  # kept: no target yet
    assert len(dataset) == 1


def sampled_examples(sampler, model, tokenizer, prompts, source=STUDENT, max_length=64):
    examples = [
        tokenize_example({"prompt": p}, "prompt", tokenizer, max_length, True) | {"sample_id": i}
        for i, p in enumerate(prompts)
    ]
    return sampler.sample(model, examples, tokenizer, max_length, source)


def test_samples_keep_the_prompt_end_after_eos_and_resume_from_the_saved_state(model_dirs, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["student"])
    settings = OnPolicySettings(student_fraction=1.0, max_new_tokens=20, temperature=1.5)
    prompts = [row["prompt"] for row in addition_rows(6)]
    sampler = Sampler(settings, seed=3, rank=0, device=torch.device("cpu"))
    built, stats = sampled_examples(sampler, model, tokenizer, prompts)
    eos = tokenizer.eos_token_id
    for example, prompt in zip(built, prompts):
        prompt_ids = encode_prompt(tokenizer, prompt)
        assert example["input_ids"][: len(prompt_ids)] == prompt_ids
        completion = example["input_ids"][len(prompt_ids) :]
        assert 1 <= len(completion) <= 20
        assert eos not in completion[:-1]  # cut right after the first EOS
        assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion
        assert example["loss_weight"] == 0.0  # no `ce` on the student's own samples
    assert stats["on_policy/sampled_length"] == sum(len(e["input_ids"]) - e["prompt_length"] for e in built) / 6
    # the logged figure (chunked head, one forward pass) is the mean log-softmax of the model's own logits
    with torch.no_grad():
        reference = []
        for example in built:
            logits = model(torch.tensor([example["input_ids"]])).logits[0, :-1]
            reference += torch.log_softmax(logits, -1)[torch.arange(len(logits)), example["input_ids"][1:]][
                example["prompt_length"] - 1 :
            ].tolist()
    assert stats["on_policy/student_logprob"] == pytest.approx(sum(reference) / len(reference), rel=1e-5)

    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    sampler.save(tmp_path)  # the state after the first sampling
    second, _ = sampled_examples(sampler, model, tokenizer, prompts)
    assert torch.equal(torch.rand(3), before)  # torch's global generator is left as it was
    restored = Sampler(settings, seed=3, rank=0, device=torch.device("cpu"))
    assert restored.load(tmp_path)
    again, _ = sampled_examples(restored, model, tokenizer, prompts)
    assert [e["input_ids"] for e in again] == [e["input_ids"] for e in second]
    assert [e["input_ids"] for e in second] != [e["input_ids"] for e in built]  # new samples each time
    other_rank = Sampler(settings, seed=3, rank=1, device=torch.device("cpu"))
    assert [e["input_ids"] for e in sampled_examples(other_rank, model, tokenizer, prompts)[0]] != [
        e["input_ids"] for e in built
    ]


def test_draws_agree_across_ranks_and_replay_reuses_the_buffer():
    settings = OnPolicySettings(student_fraction=0.5, teacher_fraction=0.25, replay_ratio=0.5, replay_buffer_size=8)
    ranks = [Sampler(settings, seed=1, rank=r, device=torch.device("cpu")) for r in (0, 1)]
    for sampler in ranks:
        sampler.remember([{"input_ids": [1, 2, 3], "prompt_length": 2, "sample_id": i} for i in range(10)])
        assert [e["sample_id"] for e in sampler.buffer] == list(range(2, 10))  # the newest 8
    draws = [[sampler.draw(4) for _ in range(400)] for sampler in ranks]
    assert draws[0] == draws[1]
    share = {source: draws[0].count(source) / 400 for source in (STUDENT, REPLAY, TEACHER, OFF_POLICY)}
    assert share[STUDENT] + share[REPLAY] == pytest.approx(0.5, abs=0.08)
    assert share[REPLAY] == pytest.approx(0.25, abs=0.08) and share[TEACHER] == pytest.approx(0.25, abs=0.08)
    picked, stats = ranks[0].replay(4)
    assert len(picked) == 4 and stats["on_policy/sample_seconds"] == 0.0


@pytest.mark.parametrize("replay_ratio", [0.0, 0.5])
def test_upcoming_sources_are_certain_and_leave_the_draws_alone(replay_ratio):
    """What Sampler.upcoming calls off-policy is what draw then answers; a sampled one is None; after a draw that
    may replay (its indices come from the same generator) nothing is promised; the draws themselves do not move."""
    settings = OnPolicySettings(student_fraction=0.4, teacher_fraction=0.0, replay_ratio=replay_ratio)
    sampler = Sampler(settings, seed=2, rank=0, device=torch.device("cpu"))
    sampler.remember([{"input_ids": [1, 2, 3], "prompt_length": 2, "sample_id": i} for i in range(8)])
    promised = 0
    for _ in range(60):
        twin = Sampler(settings, seed=2, rank=0, device=torch.device("cpu"))
        twin.load_state_dict(sampler.state_dict())
        upcoming = sampler.upcoming(3)
        assert twin.draws.get_state().equal(sampler.draws.get_state())
        actual = []
        for _ in range(3):
            actual.append(sampler.draw(4))
            if actual[-1] == REPLAY:
                sampler.replay(4)
        exact = [OFF_POLICY if got == OFF_POLICY else None for got in actual]
        assert all(said is None or said == want for said, want in zip(upcoming, exact))  # never wrong
        assert upcoming == exact or replay_ratio > 0  # and complete where nothing replays
        promised += upcoming.count(OFF_POLICY)
    assert promised > 60  # about 0.6 x 180 without replay, fewer with it


def test_loss_on_a_sampled_batch_equals_the_direct_reverse_kl(model_dirs, prompts_file, tmp_path):
    distiller = Distiller(
        config(model_dirs, prompts_file, tmp_path / "out", loss={"terms": {"reverse_kl": 1.0}, "chunk_size": 5})
    )
    batches, sources, _ = distiller.next_micro_batches()
    batch = batches[0]
    assert sources == [STUDENT]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()  # padding after EOS never counts
    with distiller.teacher_targets(batch) as teacher:
        terms = distiller.module(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            teacher=teacher,
            loss_weights=batch["loss_weights"],
        )
    student, reference_teacher = distiller.module.student, distiller.teacher.model
    with torch.no_grad():
        s = F.log_softmax(student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
        t = F.log_softmax(
            reference_teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1
        )
    counted = batch["labels"][:, 1:] != IGNORE_INDEX
    reverse_kl = (s.exp() * (s - t)).sum(-1)[counted].sum()
    assert terms["reverse_kl"].item() == pytest.approx(reverse_kl.item(), rel=1e-4)
    assert "ce" not in terms


def logged(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_command(model_dirs, data, out, *extra):
    return [
        "--output_dir",
        str(out),
        "--max_steps",
        "6",
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
        str(data),
        "--data.eval_fraction",
        "0",
        "--loss.terms",
        "{jsd: 1, ce: 0.2}",
        "--on_policy.max_new_tokens",
        "10",
        *extra,
    ]


def assert_same_weights(reference, resumed):
    want = load_file(str(reference / "final" / "model.safetensors"))
    got = load_file(str(resumed / "final" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert (got[name] - tensor).abs().max().item() <= 1e-6, name


def losses(out):
    return {r["step"]: r["train/loss"] for r in logged(out) if "train/loss" in r}


@pytest.mark.slow
def test_mixed_sources_with_replay_resume_exactly_after_kill_9(model_dirs, train_file, tmp_path):
    """Student samples, teacher samples, replayed samples and dataset completions in one run; killed with SIGKILL
    after its third checkpoint, resumed: the same losses at every step and the same weights."""
    mixed = (
        "--on_policy.student_fraction",
        "0.5",
        "--on_policy.teacher_fraction",
        "0.25",
        "--on_policy.replay_ratio",
        "0.7",
        "--gradient_accumulation_steps",
        "2",
    )
    base = [sys.executable, "-m", "distill", "train"]
    reference = tmp_path / "reference"
    done = subprocess.run(
        [*base, *train_command(model_dirs, train_file, reference, *mixed)],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(reference / "checkpoint-6" / "on_policy_rank_0.pt", weights_only=True)
    assert all(state["counts"][source] > 0 for source in (STUDENT, TEACHER, REPLAY, OFF_POLICY)), state["counts"]
    assert any("train/on_policy/teacher_logprob" in r for r in logged(reference))

    out = tmp_path / "killed"
    command = [*base, *train_command(model_dirs, train_file, out, *mixed)]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=slowed_steps(ENV, 0.5), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    import time

    deadline = time.time() + 300
    while not (out / "checkpoint-3").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.kill()
    process.wait()
    assert not (out / "final").exists()
    resumed = subprocess.run(
        [*command, "--resume", "auto"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoint-" in resumed.stderr
    want, got = losses(reference), losses(out)
    assert got.keys() == want.keys() == set(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert_same_weights(reference, out)


@pytest.mark.slow
def test_zero3_two_ranks_sample_their_own_prompts_and_resume_exactly(model_dirs, prompts_file, tmp_path):
    """Every micro-batch sampled by a ZeRO-3-sharded student (weights gathered for sampling); stopped after step 3
    (the run directory cut back to checkpoint-3, as a kill would leave it) and resumed: identical to the
    uninterrupted run."""
    import shutil

    def launch(out, *extra):
        command = [
            "accelerate",
            "launch",
            "--config_file",
            "launch/zero3.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "-m",
            "distill",
            "train",
            *train_command(
                model_dirs,
                prompts_file,
                out,
                "--on_policy.student_fraction",
                "1",
                "--loss.terms",
                "{reverse_kl: 1}",
                *extra,
            ),
        ]
        result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    reference = tmp_path / "reference"
    launch(reference)
    states = [torch.load(reference / "checkpoint-3" / f"on_policy_rank_{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(states[0]["sampler_state"]["cpu"], states[1]["sampler_state"]["cpu"])  # own samples
    assert torch.equal(states[0]["draws"], states[1]["draws"])  # the same draws
    out = tmp_path / "stopped"
    out.mkdir()
    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    shutil.copy(reference / ".kd_owner.json", out / ".kd_owner.json")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged(reference) if r["step"] <= 3))
    launch(out, "--resume", "auto")
    want, got = losses(reference), losses(out)
    assert got.keys() == want.keys() == set(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert_same_weights(reference, out)


def test_shipped_config_trains_a_lora_student_on_its_own_samples(model_dirs, prompts_file, tmp_path):
    """configs/on_policy_reverse_kl.yaml on the tiny pair, with LoRA: the adapters generate (the peft model samples)
    and train; the figures of the time split, lengths and log-probabilities are logged."""
    from distill.training.train import run
    from kd_core.config import parse_command_line

    cfg = parse_command_line(
        TrainConfig,
        [
            "--config",
            str(REPO_ROOT / "configs" / "on_policy_reverse_kl.yaml"),
            "--output_dir",
            str(tmp_path / "out"),
            "--model.teacher",
            str(model_dirs["teacher"]),
            "--model.student",
            str(model_dirs["student"]),
            "--data.train_file",
            str(prompts_file),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--on_policy.max_new_tokens",
            "8",
            "--logging_steps",
            "1",
            "--report_to",
            "[none]",
            "--lora.enabled",
            "true",
            "--lora.r",
            "4",
            "--learning_rate",
            "1e-2",
        ],
        "distill train",
    )
    result = run(cfg)
    assert result.steps == 3
    rows = logged(tmp_path / "out")
    for key in (
        "train/on_policy/sample_seconds",
        "train/on_policy/sampled_length",
        "train/step_seconds",
        "train/on_policy/student_logprob",
        "train/on_policy/teacher_logprob",
        "train/reverse_kl",
    ):
        assert all(key in r for r in rows if "train/loss" in r), key
    assert all(0 < r["train/on_policy/sampled_length"] <= 8 for r in rows if "train/loss" in r)
    assert (tmp_path / "out" / "final" / "adapter").is_dir()


def test_replay_saves_generation_for_the_same_number_of_on_policy_steps(model_dirs, prompts_file, tmp_path):
    """Six fully on-policy steps with and without replay: with replay_ratio 0.5 fewer micro-batches are generated
    (the rest reuse buffered samples), fewer tokens are sampled and the replayed steps spend no time sampling."""
    runs = {}
    for ratio in (0.0, 0.5):
        distiller = Distiller(
            config(
                model_dirs,
                prompts_file,
                tmp_path / f"r{ratio}",
                on_policy={"replay_ratio": ratio, "replay_buffer_size": 8},
            )
        )
        seconds = [distiller.training_step()["on_policy/sample_seconds"] for _ in range(6)]
        runs[ratio] = (dict(distiller.sampler.counts), seconds)
    plain, replayed = runs[0.0][0], runs[0.5][0]
    assert plain[STUDENT] == 6 and plain[REPLAY] == 0
    assert replayed[STUDENT] + replayed[REPLAY] == 6 and replayed[REPLAY] >= 1
    assert replayed["generated_tokens"] < plain["generated_tokens"]
    assert sorted(runs[0.5][1])[: replayed[REPLAY]] == [0.0] * replayed[REPLAY]
