"""Calibration data: the three record formats, chat templates, limits, and padding that never counts."""

from __future__ import annotations

import json

import pytest
import torch

from distill.student.prune.calibration import load_calibration
from distill.student.prune.families import family_for
from distill.student.prune.importance import collect_importance
from distill.student.tiny import tiny_llama
from kd_core.config import ConfigError

CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]


def _write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_formats_templates_and_limits(tmp_path, tokenizer) -> None:
    path = tmp_path / "c.jsonl"
    _write(
        path,
        [
            {"messages": CHAT},
            {"prompt": "What is 2+2?", "completion": "It is 4."},
            {"text": "plain " * 50},
            {"text": "x"},
        ],
    )
    cal = load_calibration(path, tokenizer, num_samples=3, max_length=40, min_tokens=8)
    assert cal.num_samples == 3  # the 4th line is never read
    templated = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert cal.input_ids[0, : len(templated)].tolist() == templated
    assert cal.input_ids[1, : len(templated)].tolist() == templated  # prompt/completion rendered as the same chat
    assert cal.attention_mask[2].sum() == 40  # truncated to max_length
    assert cal.num_tokens == int(cal.attention_mask.sum())
    assert cal.fingerprint() != load_calibration(path, tokenizer, 2, 40, 8).fingerprint()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["{not json"], "not valid JSON"),
        ([{"question": "q"}], "expected a 'messages', 'prompt' or 'text' field"),
        (["[1, 2]"], "expected a JSON object"),
        ([""], "holds no samples"),
    ],
)
def test_bad_files(tmp_path, tokenizer, rows, message: str) -> None:
    path = tmp_path / "c.jsonl"
    _write(path, rows)
    with pytest.raises(ConfigError, match=message):
        load_calibration(path, tokenizer, 4, 32, 1)
    with pytest.raises(ConfigError, match="file not found"):
        load_calibration(tmp_path / "missing.jsonl", tokenizer, 4, 32, 1)


def test_padding_does_not_change_importance(tmp_path, tokenizer) -> None:
    model = tiny_llama(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    family = family_for(model.config)
    path = tmp_path / "c.jsonl"
    _write(path, [{"text": "a short one"}, {"text": "a much longer sample that forces padding of the first row"}])
    cal = load_calibration(path, tokenizer, 2, 64, 4)
    together = collect_importance(model, family, cal, batch_size=2)  # row 0 is padded
    alone = collect_importance(model, family, cal, batch_size=1)  # no padding at all
    for key, value in together.channels.items():
        torch.testing.assert_close(value, alone.channels[key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together.block_influence, alone.block_influence, rtol=1e-4, atol=1e-6)
