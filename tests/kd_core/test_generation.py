"""kd_core.generation samples from the model's own distribution: whatever the checkpoint's generation config switches
on (here ``repetition_penalty`` 1.3, ``min_p`` 0.2 and ``top_k`` 5) is neutral unless ``generation_kwargs`` asks for
it by name."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from distill.student.tiny import tiny_llama
from kd_core.generation import NEUTRAL_GENERATION, check_generation_kwargs, generate_tokens

VOCAB = 64


@pytest.fixture(scope="module")
def opinionated_model():
    """A tiny Llama whose generation_config.json would reshape every distribution it samples from."""
    model = tiny_llama(VOCAB, hidden_size=32, num_layers=2, seed=3).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0)  # peaked distributions (a random model's are near uniform): min_p cuts
    model.generation_config = GenerationConfig(repetition_penalty=1.3, min_p=0.2, top_k=5, no_repeat_ngram_size=2)
    return model


def spied_generate(model, monkeypatch) -> list:
    """Keeps each generate output with its raw logits and its processed scores (the real generate runs)."""
    captured, real = [], model.generate

    def generate(**kwargs):
        out = real(**kwargs | {"output_logits": True, "output_scores": True})
        captured.append(out)
        return out

    monkeypatch.setattr(model, "generate", generate)
    return captured


def step_logprobs(out, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step, the log-probabilities generate sampled from and the raw softmax at ``temperature``."""
    scores = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)
    raw = torch.log_softmax(torch.stack(out.logits, 1).float() / temperature, -1)
    return scores, raw


PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11]]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_distribution_is_the_raw_softmax_at_the_temperature(opinionated_model, monkeypatch, temperature):
    captured = spied_generate(opinionated_model, monkeypatch)
    torch.manual_seed(0)
    samples = generate_tokens(
        opinionated_model, PROMPTS, pad_token_id=0, eos_token_ids=[], max_new_tokens=12, temperature=temperature
    )
    scores, raw = step_logprobs(captured[0], temperature)
    torch.testing.assert_close(scores, raw, rtol=0, atol=1e-5)
    assert [len(s.tokens) for s in samples] == [12, 12]


def test_greedy_is_the_argmax_of_the_raw_logits(opinionated_model, monkeypatch):
    captured = spied_generate(opinionated_model, monkeypatch)
    samples = generate_tokens(opinionated_model, PROMPTS, pad_token_id=0, eos_token_ids=[], max_new_tokens=12)
    logits = torch.stack(captured[0].logits, 1)
    assert [s.tokens for s in samples] == logits.argmax(-1).tolist()


def test_the_checkpoint_settings_would_have_changed_the_distribution(opinionated_model):
    """The control: generate given only temperature, top-p and top-k (what it was given before) samples from
    another distribution than the raw softmax, so the tests above can fail."""
    torch.manual_seed(0)
    out = opinionated_model.generate(
        input_ids=torch.tensor([PROMPTS[0]]),
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=12,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        output_scores=True,
    )
    scores, raw = step_logprobs(out, 1.0)
    assert not torch.allclose(scores, raw, atol=1e-3)
    assert torch.isinf(scores).any()  # min_p (or the n-gram ban) cut tokens off


def test_generation_kwargs_turn_one_knob_on(opinionated_model, monkeypatch):
    captured = spied_generate(opinionated_model, monkeypatch)
    generate_tokens(
        opinionated_model,
        PROMPTS,
        pad_token_id=0,
        eos_token_ids=[],
        max_new_tokens=6,
        generation_kwargs={"repetition_penalty": 1.3},
    )
    out = captured[0]
    logits, scores = torch.stack(out.logits, 1), torch.stack(out.scores, 1)
    width = out.sequences.shape[1] - logits.shape[1]
    penalised = torch.zeros_like(logits[:, -1], dtype=torch.bool)
    for row, prompt in enumerate(PROMPTS):  # the prompt (not its left padding) and the tokens before the last step
        penalised[row, prompt + out.sequences[row, width:-1].tolist()] = True
    last_raw, last = logits[:, -1], scores[:, -1]
    expected = torch.where(last_raw > 0, last_raw / 1.3, last_raw * 1.3)
    torch.testing.assert_close(last[penalised], expected[penalised])
    torch.testing.assert_close(last[~penalised], last_raw[~penalised])


def test_neutral_settings_cover_every_processor_of_transformers():
    """Each neutral knob is a GenerationConfig field, and a default GenerationConfig is neutral on it."""
    fields = vars(GenerationConfig())
    missing = {k for k in NEUTRAL_GENERATION if k not in fields}
    assert missing <= {"top_h"}, missing  # top_h arrived in transformers 5.x; older releases lack it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.5}, "on_policy.generation_kwargs.temperature: set by its own option"),
        (
            {"repetiton_penalty": 1.1},
            "on_policy.generation_kwargs.repetiton_penalty: not a transformers GenerationConfig",
        ),
    ],
)
def test_generation_kwargs_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_generation_kwargs(kwargs, "on_policy.generation_kwargs")
    check_generation_kwargs({"repetition_penalty": 1.1, "min_p": 0.05}, "on_policy.generation_kwargs")
