"""Bad inputs end in one line naming the field or file and what was expected, exit code 2, and leave every file on
disk byte-identical (issue 15: no tracebacks on user mistakes). Each case builds its inputs under ``tmp_path``
(including a pre-existing directory of the user's), runs a command in-process through ``run_command`` and compares
``tree_digest(tmp_path)`` before and after; one case runs as a real process to prove the exit status."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kd_core.commands import run_command
from tests.conftest import REPO_ROOT, tree_digest, write_jsonl

ROWS = [{"prompt": f"What is {i} plus 1?", "completion": f"The answer is {i + 1}."} for i in range(16)]


def _copy_model(model_dirs, tmp_path: Path, name: str = "student") -> Path:
    target = tmp_path / f"broken_{name}"
    shutil.copytree(model_dirs[name], target)
    return target


def _train_argv(
    model_dirs, tmp_path: Path, *extra: str, student: str | None = "default", data: Path | None = None
) -> list[str]:
    data = data or write_jsonl(tmp_path / "train.jsonl", ROWS)
    argv = [
        "--output_dir",
        str(tmp_path / "new_run"),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "[none]",
        "--data.eval_fraction",
        "0",
        "--model.teacher",
        str(model_dirs["teacher"]),
        "--data.train_file",
        str(data),
        "--loss.terms",
        "{forward_kl: 0.7, ce: 0.3}",
    ]
    if student == "default":
        argv += ["--model.student", str(model_dirs["student"])]
    elif student is not None:
        argv += ["--model.student", student]
    return argv + list(extra)


# --- model directories --------------------------------------------------------------------------------------------


def model_not_json(model_dirs, tmp_path):
    broken = _copy_model(model_dirs, tmp_path)
    (broken / "config.json").write_text("{not json")
    return _train_argv(model_dirs, tmp_path, student=str(broken))


def model_no_weights(model_dirs, tmp_path):
    broken = _copy_model(model_dirs, tmp_path)
    (broken / "model.safetensors").unlink()
    return _train_argv(model_dirs, tmp_path, student=str(broken))


def model_truncated(model_dirs, tmp_path):
    broken = _copy_model(model_dirs, tmp_path)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return _train_argv(model_dirs, tmp_path, student=str(broken))


def model_no_tokenizer(model_dirs, tmp_path):
    broken = _copy_model(model_dirs, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    return _train_argv(model_dirs, tmp_path, student=str(broken))


def attention_not_installed(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--model.attn_implementation", "flash_attention_2")


# --- datasets -----------------------------------------------------------------------------------------------------


def data_messages_string(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "msgs.jsonl", [{"messages": "hello there"}] * 8)
    return _train_argv(model_dirs, tmp_path, data=data)


def data_message_without_content(model_dirs, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user"}, {"role": "assistant", "content": "hello"}]}
    data = write_jsonl(tmp_path / "msgs.jsonl", [good] * 5 + [bad] + [good] * 4)
    return _train_argv(model_dirs, tmp_path, data=data)


def data_number_as_text(model_dirs, tmp_path):
    data = tmp_path / "nums.jsonl"  # a blank first line: the error names the file's line, not the row
    data.write_text("\n" + "\n".join(json.dumps({"prompt": i, "completion": "x"}) for i in range(8)) + "\n")
    return _train_argv(model_dirs, tmp_path, data=data)


def data_unknown_role(model_dirs, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assitant", "content": "hello"}]}
    data = write_jsonl(tmp_path / "msgs.jsonl", [good] * 6 + [bad] + [good] * 3)
    return _train_argv(model_dirs, tmp_path, data=data)


def data_mixed_shapes(model_dirs, tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", ROWS[:4] + [chat] + ROWS[4:8])  # line 1 is a valid prompt/completion
    return _train_argv(model_dirs, tmp_path, data=data)


def data_smaller_than_batch(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "small.jsonl", ROWS[:3])
    return _train_argv(model_dirs, tmp_path, data=data)


# --- numbers, YAML, overrides, trackers, output paths ---------------------------------------------------------


def nan_learning_rate(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--learning_rate", "nan")


def inf_loss_weight(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--loss.terms", "{forward_kl: .inf, ce: 0.3}")


def schedule_missing_term(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--loss.terms_at_end", "{ce: 1.0}")


def nan_temperature(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--loss.temperature", "NaN")


def duplicate_yaml_key(model_dirs, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 1\nlearning_rate: 1.0e-3\nseed: 3\nlearning_rate: 1.0e-4\n")
    return ["--config", str(config), *_train_argv(model_dirs, tmp_path)]


def overrides_zero_layers(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--model.student_overrides", "{num_hidden_layers: 0}", student=None)


def overrides_heads_not_dividing(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--model.student_overrides", "{num_attention_heads: 5}", student=None)


def overrides_kv_heads_not_dividing(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--model.student_overrides", "{num_key_value_heads: 3}", student=None)


def tracker_not_installed(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--report_to", "[wandb]")


def output_dir_is_file(model_dirs, tmp_path):
    target = tmp_path / "existing" / "a_file.txt"
    return _train_argv(model_dirs, tmp_path, "--output_dir", str(target))


def prune_no_weights(model_dirs, tmp_path):
    broken = _copy_model(model_dirs, tmp_path, "teacher")
    (broken / "model.safetensors").unlink()
    return ["--model", str(broken), "--output_dir", str(tmp_path / "pruned"), "--depth.num_layers", "2"]


def eval_no_tokenizer(model_dirs, tmp_path):
    broken = _copy_model(model_dirs, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    data = write_jsonl(tmp_path / "eval.jsonl", ROWS[:4])
    return [str(broken), "--data", str(data)]


# --- every other command -------------------------------------------------------------------------------------------


def _local_teacher(model_dirs) -> list[str]:
    return [
        "--teacher.backend",
        "local",
        "--teacher.model",
        str(model_dirs["teacher"]),
        "--teacher.api_key_env",
        "null",
    ]


def _questions(tmp_path: Path, bad_row: bool = False) -> Path:
    rows = [
        {"question": "What is 1 plus 1?", "answer": "#### 2"},
        {"question": 5 if bad_row else "2 + 2?", "answer": "#### 4"},
    ]
    return write_jsonl(tmp_path / "questions.jsonl", rows)


def _a_file(tmp_path: Path) -> Path:
    target = tmp_path / "existing" / "a_file.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("the user's file\n")
    return target


def precompute_output_is_file(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return [
        "--teacher",
        str(model_dirs["teacher"]),
        "--data.train_file",
        str(data),
        "--output_dir",
        str(_a_file(tmp_path)),
    ]


def precompute_nan_temperature(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return [
        "--teacher",
        str(model_dirs["teacher"]),
        "--data.train_file",
        str(data),
        "--output_dir",
        str(tmp_path / "store"),
        "--temperature",
        "nan",
    ]


def precompute_duplicate_yaml_key(model_dirs, tmp_path):
    config = tmp_path / "store.yaml"
    config.write_text("k: 4\nbatch_size: 2\nk: 8\n")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return [
        "--config",
        str(config),
        "--teacher",
        str(model_dirs["teacher"]),
        "--data.train_file",
        str(data),
        "--output_dir",
        str(tmp_path / "store"),
    ]


def export_not_a_checkpoint(model_dirs, tmp_path):
    folder = tmp_path / "my_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a checkpoint\n")
    return ["--checkpoint", str(folder), "--output_dir", str(tmp_path / "exported")]


def plot_not_a_run(model_dirs, tmp_path):
    folder = tmp_path / "my_folder"
    folder.mkdir()
    return [str(folder)]


def dedup_output_is_file(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return [str(data), "--field", "prompt", "--output_dir", str(_a_file(tmp_path))]


def dedup_field_missing(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return [str(data), "--field", "instruction", "--output_dir", str(tmp_path / "deduped")]


def cot_question_not_text(model_dirs, tmp_path):
    return [
        "--input_file",
        str(_questions(tmp_path, bad_row=True)),
        *_local_teacher(model_dirs),
        "--output.dir",
        str(tmp_path / "cot"),
    ]


def cot_output_is_file(model_dirs, tmp_path):
    return [
        "--input_file",
        str(_questions(tmp_path)),
        *_local_teacher(model_dirs),
        "--output.dir",
        str(_a_file(tmp_path)),
    ]


def self_instruct_seed_file_missing(model_dirs, tmp_path):
    return [
        "--seed_tasks",
        str(tmp_path / "seed_tasks.jsonl"),
        *_local_teacher(model_dirs),
        "--output.dir",
        str(tmp_path / "self_instruct"),
    ]


def lion_student_missing(model_dirs, tmp_path):
    return [
        "--train_pool",
        str(_questions(tmp_path)),
        "--student",
        str(tmp_path / "no_student"),
        *_local_teacher(model_dirs),
        "--output_dir",
        str(tmp_path / "lion"),
    ]


# --- output ownership and resume identity (issue 31) ---------------------------------------------------------------


def _finished_run(model_dirs, tmp_path: Path, student: str | None = None) -> Path:
    """A finished 2-step training run (checkpoint-1, checkpoint-2) under tmp_path/finished_run."""
    from distill.training.train import main as train_main

    out = tmp_path / "finished_run"
    argv = _train_argv(
        model_dirs,
        tmp_path,
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--output_dir",
        str(out),
        student=student or "default",
    )
    assert run_command(train_main, argv) == 0
    return out


def resume_another_runs_checkpoint(model_dirs, tmp_path):
    copy = _copy_model(model_dirs, tmp_path)  # the same student, elsewhere: another run's checkpoint
    run = _finished_run(model_dirs, tmp_path, student=str(copy))
    return _train_argv(model_dirs, tmp_path, "--resume", str(run / "checkpoint-2"))


def resume_a_run_directory(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--resume", str(_finished_run(model_dirs, tmp_path)))


def resume_a_model_directory(model_dirs, tmp_path):
    return _train_argv(model_dirs, tmp_path, "--resume", str(_copy_model(model_dirs, tmp_path)))


def _size_only_manifest_with_corrupt_weights(model_dirs, tmp_path) -> Path:
    """A checkpoint whose manifest is the earlier version's (sizes only), its weights' header corrupted in place."""
    checkpoint = _finished_run(model_dirs, tmp_path) / "checkpoint-2"
    manifest = checkpoint / "manifest.json"
    files = json.loads(manifest.read_text())["files"]
    manifest.write_text(json.dumps({"files": {name: entry["size"] for name, entry in files.items()}}))
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[12] ^= 0xFF  # inside the JSON header: same size
    weights.write_bytes(bytes(data))
    return checkpoint


def export_size_only_manifest_corrupt_weights(model_dirs, tmp_path):
    return [
        "--checkpoint",
        str(_size_only_manifest_with_corrupt_weights(model_dirs, tmp_path)),
        "--output_dir",
        str(tmp_path / "exported"),
    ]


def resume_size_only_manifest_corrupt_weights(model_dirs, tmp_path):
    return _train_argv(
        model_dirs, tmp_path, "--resume", str(_size_only_manifest_with_corrupt_weights(model_dirs, tmp_path))
    )


def dedup_overwrite_into_a_training_run(model_dirs, tmp_path):
    return [
        str(write_jsonl(tmp_path / "records.jsonl", ROWS)),
        "--field",
        "prompt",
        "--overwrite",
        "--output_dir",
        str(_finished_run(model_dirs, tmp_path)),
    ]


def lion_pool_without_instructions(model_dirs, tmp_path):
    return [
        "--train_pool",
        str(_questions(tmp_path)),
        "--student",
        str(model_dirs["student"]),
        *_local_teacher(model_dirs),
        "--output_dir",
        str(tmp_path / "lion"),
    ]


def quickstart_output_is_file(model_dirs, tmp_path):
    return ["--output_dir", str(_a_file(tmp_path))]


def quickstart_nan_learning_rate(model_dirs, tmp_path):
    return ["--output_dir", str(tmp_path / "quickstart"), "--learning_rate", "nan"]


def on_policy_fractions_over_one(model_dirs, tmp_path):
    return _train_argv(
        model_dirs,
        tmp_path,
        "--loss.terms",
        "{reverse_kl: 1}",
        "--on_policy.student_fraction",
        "0.8",
        "--on_policy.teacher_fraction",
        "0.5",
    )


# --- issue 31: models that are what they claim, empty or misplaced config, replay, secrets --------------------------


def _tiny_gguf(tmp_path: Path, name: str, **kwargs) -> Path:
    from distill.student.tiny import tiny_llama, train_tokenizer
    from tests.conftest import CORPUS, write_llama_gguf

    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    return write_llama_gguf(tmp_path / name, tiny_llama(len(tokenizer), hidden_size=32), tokenizer, **kwargs)


def gguf_without_tensors(model_dirs, tmp_path):
    teacher = _tiny_gguf(tmp_path, "header_only.gguf", tensors=False)
    return _train_argv(model_dirs, tmp_path, "--model.teacher", str(teacher))


def gguf_general_architecture(model_dirs, tmp_path):
    model = _tiny_gguf(tmp_path, "general.gguf", architecture="general")
    return ["--model", str(model), "--output_dir", str(tmp_path / "pruned"), "--depth.num_layers", "1"]


def gguf_is_a_directory(model_dirs, tmp_path):
    folder = tmp_path / "x.gguf"
    folder.mkdir()
    return [str(folder), "--data", str(write_jsonl(tmp_path / "eval.jsonl", ROWS[:4]))]


def precompute_gguf_without_tensors(model_dirs, tmp_path):
    return [
        "--teacher",
        str(_tiny_gguf(tmp_path, "empty.gguf", tensors=False)),
        "--data.train_file",
        str(write_jsonl(tmp_path / "train.jsonl", ROWS)),
        "--output_dir",
        str(tmp_path / "store"),
    ]


def precompute_prompts_only(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in ROWS])
    return [
        "--teacher",
        str(model_dirs["teacher"]),
        "--data.train_file",
        str(data),
        "--output_dir",
        str(tmp_path / "store"),
    ]


def empty_loss_section(model_dirs, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 1\nloss:\n")
    argv = [a for a in _train_argv(model_dirs, tmp_path) if a not in ("--loss.terms", "{forward_kl: 0.7, ce: 0.3}")]
    return ["--config", str(config), *argv]


def key_at_the_wrong_level(model_dirs, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 1\ntemperature: 2.0\n")
    return ["--config", str(config), *_train_argv(model_dirs, tmp_path)]


def replay_buffer_below_one_batch(model_dirs, tmp_path):
    return _train_argv(
        model_dirs,
        tmp_path,
        "--loss.terms",
        "{reverse_kl: 1}",
        "--on_policy.student_fraction",
        "0.5",
        "--on_policy.replay_ratio",
        "0.5",
        "--on_policy.replay_buffer_size",
        "2",
    )


def hex_key_as_env_name(model_dirs, tmp_path):
    return [
        "--input_file",
        str(_questions(tmp_path)),
        "--teacher.model",
        "m",
        "--teacher.api_key_env",
        "0f3a9c2e7b1d4f6a8c0e2b4d6f8a1c3e",
        "--output.dir",
        str(tmp_path / "cot"),
    ]


# --- issue 28: cross-tokenizer distillation -----------------------------------------------------------------------


def _teacher_with_tokenizer(model_dirs, tmp_path: Path, tokenizer) -> Path:
    """The tiny teacher's weights with another tokenizer saved beside them."""
    teacher = tmp_path / "other_teacher"
    shutil.copytree(model_dirs["teacher"], teacher, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    tokenizer.save_pretrained(teacher)
    return teacher


def cross_slow_teacher_tokenizer(model_dirs, tmp_path):
    from transformers import BertTokenizerLegacy

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "is", "plus", "the", "answer"]) + "\n")
    teacher = _teacher_with_tokenizer(model_dirs, tmp_path, BertTokenizerLegacy(str(vocab)))
    vocab.unlink()
    return _train_argv(model_dirs, tmp_path, "--model.teacher", str(teacher), "--loss.cross_tokenizer", "uld")


def cross_gold_no_shared_strings(model_dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["\u03b1\u03b2\u03b3 \u03b4\u03b5\u03b6 \u03b7\u03b8"] * 10,
        trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"], show_progress=False),
    )
    teacher = _teacher_with_tokenizer(
        model_dirs, tmp_path, PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    )
    return _train_argv(model_dirs, tmp_path, "--model.teacher", str(teacher), "--loss.cross_tokenizer", "gold")


def cross_other_chat_template(model_dirs, tmp_path):
    from distill.student.tiny import train_sentencepiece_style_tokenizer
    from tests.conftest import CORPUS

    tokenizer = train_sentencepiece_style_tokenizer(CORPUS, vocab_size=400)
    tokenizer.chat_template = "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"
    teacher = _teacher_with_tokenizer(model_dirs, tmp_path, tokenizer)
    return _train_argv(model_dirs, tmp_path, "--model.teacher", str(teacher), "--loss.cross_tokenizer", "uld")


ON_POLICY = ("--on_policy.student_fraction", "1.0", "--on_policy.max_new_tokens", "4")


def cross_on_policy_slow_teacher_tokenizer(model_dirs, tmp_path):
    return cross_slow_teacher_tokenizer(model_dirs, tmp_path) + list(ON_POLICY)


def cross_on_policy_gold_no_shared_strings(model_dirs, tmp_path):
    return cross_gold_no_shared_strings(model_dirs, tmp_path) + list(ON_POLICY)


def cross_on_policy_other_chat_template(model_dirs, tmp_path):
    return cross_other_chat_template(model_dirs, tmp_path) + list(ON_POLICY)


def _last(argv: list[str], flag: str) -> int:
    return len(argv) - 1 - argv[::-1].index(flag)


def _cross_precompute_argv(argv: list[str], tmp_path: Path) -> list[str]:
    """`distill precompute` across tokenizers for the teacher (and data) of a cross-tokenizer training argv."""
    teacher, data = argv[_last(argv, "--model.teacher") + 1], argv[argv.index("--data.train_file") + 1]
    student = argv[argv.index("--model.student") + 1]
    return ["--teacher", teacher, "--student_tokenizer", student, "--data.train_file", data, "--data.eval_fraction",
            "0", "--output_dir", str(tmp_path / "cross_store"), "--k", "4"]  # fmt: skip


def cross_precompute_slow_teacher_tokenizer(model_dirs, tmp_path):
    return _cross_precompute_argv(cross_slow_teacher_tokenizer(model_dirs, tmp_path), tmp_path)


def cross_precompute_other_chat_template(model_dirs, tmp_path):
    return _cross_precompute_argv(cross_other_chat_template(model_dirs, tmp_path), tmp_path)


def cross_store_gold_no_shared_strings(model_dirs, tmp_path):
    """A store precomputed across tokenizers from a teacher that shares no token text with the student, trained
    with `gold`."""
    from distill.offline.precompute import main as precompute

    argv = cross_gold_no_shared_strings(model_dirs, tmp_path)
    assert precompute(_cross_precompute_argv(argv, tmp_path)) == 0
    teacher = _last(argv, "--model.teacher")  # the other teacher, after _train_argv's
    return [*argv[:teacher], *argv[teacher + 2 :], "--model.teacher", "null", "--loss.teacher_store",
            str(tmp_path / "cross_store")]  # fmt: skip


TRAIN = "distill.training.train"
PRECOMPUTE = "distill.offline.precompute"
CASES = [
    (TRAIN, model_not_json, r"model\.student: .*config\.json is not valid JSON"),
    (TRAIN, model_no_weights, r"model\.student: .*broken_student has no weights \(expected \*\.safetensors"),
    (TRAIN, model_truncated, r"model\.student: .*model\.safetensors is truncated or corrupt"),
    (TRAIN, model_no_tokenizer, r"model\.student: .*broken_student has no tokenizer"),
    (TRAIN, data_messages_string, r"msgs\.jsonl:1: field 'messages': expected a non-empty list .*got str"),
    (TRAIN, data_message_without_content, r"msgs\.jsonl:6: field 'messages\[0\]': the message has no 'content'"),
    (TRAIN, data_number_as_text, r"nums\.jsonl:2: field 'prompt': expected a string, got int 0"),
    (
        TRAIN,
        data_unknown_role,
        (
            r"msgs\.jsonl:7: field 'messages\[1\]\.role': unknown role 'assitant'; expected one "
            r"of system, user, assistant, tool"
        ),
    ),
    (
        TRAIN,
        data_mixed_shapes,
        (
            r"mixed\.jsonl:5: this row has the 'messages' shape .*but the data's shape is "
            r"'prompt_completion', detected from its first row \(.*mixed\.jsonl:1\): expected "
            r"column\(s\) \['prompt', 'completion'\] in every row"
        ),
    ),
    (
        TRAIN,
        data_smaller_than_batch,
        (
            r"data\.train_file: .*small\.jsonl has 3 usable .*fewer than one batch "
            r"\(per_device_train_batch_size 4 x 1 process\(es\) = 4\)"
        ),
    ),
    (TRAIN, nan_learning_rate, r"learning_rate: expected a finite number, got 'nan'"),
    (TRAIN, inf_loss_weight, r"loss\.terms\.forward_kl: expected a finite number, got inf"),
    (TRAIN, nan_temperature, r"loss\.temperature: expected a finite number"),
    (
        TRAIN,
        schedule_missing_term,
        r"loss: terms_at_end: expected a weight for each of loss\.terms \['ce', 'forward_kl'\], got \['ce'\]",
    ),
    (TRAIN, duplicate_yaml_key, r"run\.yaml:4: duplicate key 'learning_rate' \(first given on line 2\)"),
    (TRAIN, overrides_zero_layers, r"model\.student_overrides\.num_hidden_layers: expected a positive integer"),
    (TRAIN, overrides_heads_not_dividing, r"model\.student_overrides\.num_attention_heads: .*must divide hidden_size"),
    (TRAIN, overrides_kv_heads_not_dividing, r"model\.student_overrides\.num_key_value_heads: .*must divide"),
    (TRAIN, tracker_not_installed, r"report_to: tracker 'wandb' is not installed \(pip install wandb\)"),
    (TRAIN, output_dir_is_file, r"output_dir: .*a_file\.txt is a file; expected a directory"),
    ("distill.student.prune.command", prune_no_weights, r"model: .*broken_teacher has no weights"),
    ("distill.evaluation.command", eval_no_tokenizer, r"model: .*broken_student has no tokenizer"),
    (
        "distill.offline.precompute",
        precompute_output_is_file,
        r"output_dir: .*a_file\.txt is a file; expected a "
        r"directory",
    ),
    ("distill.offline.precompute", precompute_nan_temperature, r"temperature: expected a finite number, got 'nan'"),
    (
        "distill.offline.precompute",
        precompute_duplicate_yaml_key,
        r"store\.yaml:3: duplicate key 'k' \(first given on "
        r"line 1\)",
    ),
    ("distill.training.export", export_not_a_checkpoint, r"checkpoint: cannot use .*my_folder: no manifest\.json"),
    ("distill.evaluation.plot", plot_not_a_run, r"run_dir: .*my_folder/metrics\.jsonl not found"),
    ("data_gen.dedup", dedup_output_is_file, r"output_dir: .*a_file\.txt is a file; expected a directory"),
    ("data_gen.dedup", dedup_field_missing, r"train\.jsonl:1: record has no field 'instruction'"),
    (
        "data_gen.cot",
        cot_question_not_text,
        r"input_file: .*questions\.jsonl: row 1: field 'question': expected a "
        r"non-empty question string",
    ),
    ("data_gen.cot", cot_output_is_file, r"output\.dir: .*a_file\.txt is a file; expected a directory"),
    ("data_gen.self_instruct", self_instruct_seed_file_missing, r"seed_tasks: file not found: .*seed_tasks\.jsonl"),
    ("kd_recipes.lion", lion_student_missing, r"student: model directory not found: .*no_student"),
    ("kd_recipes.quickstart", quickstart_output_is_file, r"output_dir: .*a_file\.txt is a file"),
    ("kd_recipes.quickstart", quickstart_nan_learning_rate, r"learning_rate: expected a finite number, got 'nan'"),
    (
        TRAIN,
        resume_another_runs_checkpoint,
        r"resume: checkpoint .*checkpoint-2 belongs to another run "
        r"\(model\.student: checkpoint '.*broken_student' vs now '.*student'\)",
    ),
    (
        TRAIN,
        resume_a_run_directory,
        r"resume: cannot use checkpoint .*finished_run: it is a training run's output "
        r"directory, not a checkpoint; its newest checkpoint is .*checkpoint-2$",
    ),
    (
        TRAIN,
        resume_a_model_directory,
        r"resume: cannot use checkpoint .*broken_student: it is a model directory, "
        r"not a checkpoint",
    ),
    (
        TRAIN,
        resume_size_only_manifest_corrupt_weights,
        r"resume: cannot use checkpoint .*checkpoint-2: "
        r"model\.safetensors cannot be read .*sizes only\)$",
    ),
    (
        "distill.training.export",
        export_size_only_manifest_corrupt_weights,
        r"checkpoint: cannot use .*checkpoint-2: "
        r"model\.safetensors cannot be read",
    ),
    (
        "data_gen.dedup",
        dedup_overwrite_into_a_training_run,
        r"output_dir: .*finished_run exists and is not empty, "
        r"and is not a dedup output directory \(it holds a "
        r"finished distill train output\)",
    ),
    (
        "kd_recipes.lion",
        lion_pool_without_instructions,
        r"questions\.jsonl:1: field 'instruction': expected a "
        r"non-empty string",
    ),
    (
        TRAIN,
        attention_not_installed,
        r"model\.attn_implementation: 'flash_attention_2' cannot run here \(its package "
        r"or a CUDA device is missing\); this machine supports sdpa, eager",
    ),
    (
        TRAIN,
        on_policy_fractions_over_one,
        r"on_policy: student_fraction \+ teacher_fraction: expected at most 1, got "
        r"0\.8 \+ 0\.5",
    ),
    (
        TRAIN,
        gguf_without_tensors,
        r"model\.teacher: .*header_only\.gguf holds 0 tensor\(s\) but its llama architecture",
    ),
    (
        "distill.student.prune.command",
        gguf_general_architecture,
        r"model: .*general\.gguf: architecture 'general' "
        r"cannot be loaded by transformers as a causal LM",
    ),
    ("distill.evaluation.command", gguf_is_a_directory, r"model: .*x\.gguf is a directory; expected a GGUF file"),
    ("distill.offline.precompute", precompute_gguf_without_tensors, r"teacher: .*empty\.gguf holds 0 tensor"),
    (
        "distill.offline.precompute",
        precompute_prompts_only,
        r"data\.train_file: .*prompts\.jsonl: 15 of 15 examples "
        r"are prompts only",
    ),
    (TRAIN, empty_loss_section, r"loss: the section is empty"),
    (TRAIN, key_at_the_wrong_level, r"unknown config key 'temperature'; did you mean 'loss\.temperature'\?"),
    (
        TRAIN,
        replay_buffer_below_one_batch,
        r"on_policy\.replay_buffer_size: 2 samples never hold one micro-batch "
        r"\(per_device_train_batch_size 4\)",
    ),
    ("data_gen.cot", hex_key_as_env_name, r"teacher: api_key_env: expected the NAME of an environment variable"),
    (
        TRAIN,
        cross_slow_teacher_tokenizer,
        r"model\.teacher: BertTokenizerLegacy is a slow \(Python\) tokenizer without "
        r"character offsets; loss\.cross_tokenizer aligns",
    ),
    (
        TRAIN,
        cross_gold_no_shared_strings,
        r"loss\.cross_tokenizer: gold found no token whose text is the same in both "
        r"vocabularies .*use uld",
    ),
    (TRAIN, cross_other_chat_template, r"model\.teacher: the teacher's chat template differs from the student's"),
    (TRAIN, cross_on_policy_slow_teacher_tokenizer, r"model\.teacher: BertTokenizerLegacy is a slow \(Python\)"),
    (TRAIN, cross_on_policy_gold_no_shared_strings, r"loss\.cross_tokenizer: gold found no token whose text"),
    (TRAIN, cross_on_policy_other_chat_template, r"model\.teacher: the teacher's chat template differs"),
    (PRECOMPUTE, cross_precompute_slow_teacher_tokenizer, r"teacher: BertTokenizerLegacy is a slow \(Python\)"),
    (PRECOMPUTE, cross_precompute_other_chat_template, r"teacher: the teacher's chat template differs from the"),
    (TRAIN, cross_store_gold_no_shared_strings, r"loss\.cross_tokenizer: gold found no token whose text"),
]


@pytest.mark.parametrize(("module", "make_argv", "message"), CASES, ids=[c[1].__name__ for c in CASES])
def test_bad_input_is_one_line_exit_2_untouched(module, make_argv, message, model_dirs, tmp_path, capsys):
    import importlib

    if make_argv is tracker_not_installed:
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here")
    existing = tmp_path / "existing"  # a directory of the user's that nothing may touch
    existing.mkdir()
    (existing / "a_file.txt").write_text("precious")
    argv = make_argv(model_dirs, tmp_path)
    before = tree_digest(tmp_path)
    capsys.readouterr()
    code = run_command(importlib.import_module(module).main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(message, lines[0]), lines[0]
    assert tree_digest(tmp_path) == before


def test_filesystem_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys):
    def denied(_argv):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "config.yaml"))

    def full(_argv):
        raise OSError(28, "No space left on device")

    def missing(_argv):
        with open(tmp_path / "no" / "such.txt"):
            pass

    assert run_command(denied, []) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'out' / 'config.yaml'}: Permission denied\n"
    assert run_command(full, []) == 2
    assert capsys.readouterr().err == "error: No space left on device\n"
    assert run_command(missing, []) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no' / 'such.txt'}: No such file or directory\n"

    def bug(_argv):
        raise KeyError("a genuine bug")

    def socket_error(_argv):
        raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(KeyError):
        run_command(bug, [])
    with pytest.raises(ConnectionResetError):
        run_command(socket_error, [])


def test_unwritable_output_dir_is_one_line(tmp_path, monkeypatch):
    from kd_core import ownership
    from kd_core.config import ConfigError

    monkeypatch.setattr(ownership.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match=r"output_dir: .*run cannot be created: .* is not writable"):
        ownership.check_writable(tmp_path / "run", "output_dir")


def test_real_process_exit_status(model_dirs, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    argv = _train_argv(model_dirs, tmp_path, "--learning_rate", "inf")
    before = tree_digest(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "distill", "train", *argv],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "error: learning_rate: expected a finite number, got 'inf'"
    assert "Traceback" not in result.stderr
    assert tree_digest(tmp_path) == before
