"""On-policy distillation across tokenizers: the student's samples decoded and re-tokenized for the teacher (its own
tokens of the prompt, then of the sampled text), aligned by character offsets; training on them lowers the
cross-tokenizer divergence; replayed and resumed samples get the same teacher tokens; a run killed with SIGKILL and
resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from distill.data import cross
from distill.data.datasets import IGNORE_INDEX, collate
from distill.training.on_policy import REPLAY, STUDENT
from distill.training.train import Distiller
from tests.conftest import REPO_ROOT, slowed_steps
from tests.distill.training.test_cross_tokenizer_train import _config, pair  # noqa: F401 (the pair fixture)
from tests.distill.training.test_on_policy import ENV, assert_same_weights, losses, train_command


def _on_policy(pair, out, mode, **overrides):  # noqa: F811
    on_policy = {"on_policy.student_fraction": 1.0, "on_policy.max_new_tokens": 10, "on_policy.temperature": 1.0}
    return _config(pair, out, mode, **{**on_policy, **overrides})


def test_a_sample_is_re_tokenized_for_the_teacher_with_its_positions_aligned(pair, tmp_path):  # noqa: F811
    """A completion with a number (split digit by digit by the student, whole by the teacher), a character the
    student writes in byte pieces, and a final EOS: the teacher's tokens read the same text after its own prompt,
    and an aligned pair is two positions that have read the same characters."""
    from transformers import AutoTokenizer

    distiller = Distiller(_on_policy(pair, tmp_path / "one", "uld", max_steps=1, per_device_train_batch_size=4))
    student, teacher = distiller.tokenizer, AutoTokenizer.from_pretrained(pair["teacher"])
    example = distiller.train_set[0]
    prompt = list(example["input_ids"][: example["prompt_length"]])
    written = student(" The answer is 1545 \u00e9t\u00e9.", add_special_tokens=False)["input_ids"] + [
        student.eos_token_id
    ]
    sampled = {
        **example,
        "input_ids": prompt + written,
        "labels": [IGNORE_INDEX] * len(prompt) + written,
        "prompt_length": len(prompt),
    }
    columns = cross.sampled_columns(sampled, student, teacher, 64)
    teacher_prompt = list(example[cross.PROMPT_IDS])
    assert teacher_prompt and columns["teacher_input_ids"][: len(teacher_prompt)] == teacher_prompt
    # The same rendered prompt in the teacher's tokens, after the teacher's own BOS.
    assert teacher_prompt[0] == teacher.bos_token_id and teacher.decode(teacher_prompt[1:]) == student.decode(prompt)
    after = columns["teacher_input_ids"][len(teacher_prompt) :]
    assert after[-1] == teacher.eos_token_id
    assert teacher.decode(after[:-1]).strip() == student.decode(written[:-1]).strip()
    text, offsets = cross.completion_offsets(student, prompt, written[:-1])
    assert text == student.decode(written[:-1])
    pairs = list(zip(columns["align_student"], columns["align_teacher"]))
    assert pairs[0] == (len(prompt) - 1, len(teacher_prompt) - 1)  # both have read the whole prompt
    assert pairs[-1] == (len(sampled["input_ids"]) - 2, len(columns["teacher_input_ids"]) - 2)  # before the EOS
    teacher_ends = [
        b for _, b in teacher(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ]
    for i, j in pairs[1:]:
        assert offsets[i - len(prompt)][1] == teacher_ends[j - len(teacher_prompt)], (i, j)
    digits = [k for k, token in enumerate(written[:-1]) if student.decode([token]).isdigit()]
    inside = {len(prompt) + k for k in digits[:-1]}  # after 1, 15, 154: the teacher's token holds the whole number
    assert not inside & set(columns["align_student"])
    # A pure function of the sample: a replayed or resumed sample gets exactly these columns again.
    assert cross.sampled_columns(dict(sampled), student, teacher, 64) == columns
    # A teacher prompt cut by max_length has not read the whole prompt: nothing aligns (no room for a completion).
    cut = cross.sampled_columns({**sampled, cross.PROMPT_IDS: teacher_prompt[:6]}, student, teacher, 6)
    assert cut["align_student"] == cut["align_teacher"] == [] and len(cut["teacher_input_ids"]) == 6


@pytest.mark.parametrize("mode", ["uld", "gold"])
def test_training_on_its_own_samples_lowers_the_divergence_on_a_fixed_batch(pair, tmp_path, mode):  # noqa: F811
    """Every micro-batch sampled by the student (half of them replayed); the divergence to the teacher on a fixed
    batch of the dataset's completions falls."""
    cfg = _on_policy(pair, tmp_path / mode, mode, **{"on_policy.replay_ratio": 0.5})
    distiller = Distiller(cfg)
    fixed = collate([distiller.train_set[i] for i in range(8)], distiller.tokenizer.pad_token_id)

    def divergence() -> float:
        with torch.no_grad(), distiller.teacher_targets(fixed) as targets:
            terms = distiller.module(
                fixed["input_ids"], fixed["attention_mask"], fixed["labels"], teacher=targets, loss_weights=None
            )
        return terms["forward_kl"].item()

    before = divergence()
    summary = distiller.train()
    after = divergence()
    assert after < 0.8 * before, (before, after)
    counts = distiller.sampler.counts
    assert counts[STUDENT] > 0 and counts[REPLAY] > 0, counts
    assert all(h["train/on_policy/sampled_fraction"] == 1.0 for h in summary["history"])
    assert "train/on_policy/teacher_logprob" not in summary["history"][-1]  # not defined across tokenizers
    buffered = distiller.sampler.buffer[0]
    assert buffered[cross.PROMPT_IDS] and "teacher_input_ids" not in buffered  # recomputed from the sample


def test_teacher_samples_are_refused_across_tokenizers(pair, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"on_policy\.teacher_fraction: the teacher samples in its own tokens"):
        _on_policy(
            pair, tmp_path / "x", "uld", **{"on_policy.teacher_fraction": 0.5, "on_policy.student_fraction": 0.5}
        )


@pytest.mark.slow
def test_killed_and_resumed_it_ends_with_the_uninterrupted_weights(pair, tmp_path):  # noqa: F811
    """Student samples, replayed samples and dataset completions, killed with SIGKILL after its third checkpoint and
    resumed: the same losses at every step and the same weights (the replay buffer's samples get the same teacher
    tokens after the resume)."""
    models = {"teacher": pair["teacher"], "student": pair["student"]}
    extra = (
        "--loss.cross_tokenizer",
        "gold",
        "--on_policy.student_fraction",
        "0.75",
        "--on_policy.replay_ratio",
        "0.7",
    )
    base = [sys.executable, "-m", "distill", "train"]
    reference = tmp_path / "reference"
    command = [*base, *train_command(models, pair["data"], reference, *extra)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(reference / "checkpoint-6" / "on_policy_rank_0.pt", weights_only=True)
    assert state["counts"][REPLAY] > 0 and state["counts"][STUDENT] > 0, state["counts"]

    out = tmp_path / "killed"
    command = [*base, *train_command(models, pair["data"], out, *extra)]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=slowed_steps(ENV, 0.5), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (out / "checkpoint-3").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.kill()
    process.wait()
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
