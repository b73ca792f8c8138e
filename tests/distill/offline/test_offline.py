"""Offline distillation: the top-k store (codec, precompute, sharding, checks) and the top-k divergences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.losses import divergences as losses
from distill.losses.registry import DIVERGENCES
from distill.losses.topk import TopKTargets, chunked_topk_divergence, topk_per_token
from distill.offline.precompute import PrecomputeConfig, run, teacher_topk
from distill.offline.store import Codec, LogitStore
from distill.training import train
from distill.training.train import Distiller, TrainConfig
from kd_core.config import from_dict
from tests.conftest import free_port, nested_config, slowed_steps

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def precompute_config(model_dirs, train_file, out, **overrides) -> PrecomputeConfig:
    tree = {
        "teacher": str(model_dirs["teacher"]),
        "output_dir": str(out),
        "k": 16,
        "batch_size": 5,
        "data": {"train_file": str(train_file), "eval_fraction": 0.0},
    }
    tree.update(overrides)
    return from_dict(PrecomputeConfig, tree)


@pytest.fixture(scope="module")
def exact_store(model_dirs, train_file, tmp_path_factory, tokenizer) -> Path:
    """k = vocabulary size at 16-bit values: the store holds (almost exactly) the whole teacher distribution."""
    out = tmp_path_factory.mktemp("stores") / "exact"
    return run(precompute_config(model_dirs, train_file, out, k=len(tokenizer), value_bits=16))


@pytest.fixture(scope="module")
def small_store(model_dirs, train_file, tmp_path_factory) -> Path:
    return run(precompute_config(model_dirs, train_file, tmp_path_factory.mktemp("stores") / "k16"))


# ------------------------------------------------------------------------------------------------------------------
# The codec and the store
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab,k,bits", [(300, 300, 16), (300, 16, 8), (151_936, 50, 8), (70_000, 64, 4), (5, 1, 2)])
def test_codec_round_trip(vocab, k, bits):
    rng = np.random.default_rng(k)
    n = 9
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
    if k > 1:  # both ends of the vocabulary, in reverse order
        ids[0] = np.concatenate([[vocab - 1, 0], rng.choice(np.arange(1, vocab - 1), k - 2, replace=False)])
    logp = -rng.random((n, k)).astype(np.float32) * 12
    logp[1, 0] = -40.0  # below value_range: clamped
    log_tail = np.log(rng.random(n)).astype(np.float32)
    log_tail[2] = -np.inf
    codec = Codec(vocab, k, bits, 16.0)
    records = codec.encode(ids, logp, log_tail)
    assert records.shape == (n, codec.record_bytes) and records.dtype == np.uint8
    got_ids, got_logp, got_tail = codec.decode(records)
    order = np.argsort(ids, axis=1)
    np.testing.assert_array_equal(got_ids, np.take_along_axis(ids, order, axis=1))
    step = 16.0 / ((1 << bits) - 1)
    expected = np.clip(np.take_along_axis(logp, order, axis=1), -16.0, 0.0)
    assert np.abs(got_logp - expected).max() <= step / 2 + 1e-5
    np.testing.assert_allclose(got_tail, log_tail.astype(np.float16).astype(np.float32))


def test_store_holds_the_teacher_topk(small_store, model_dirs, train_file, tokenizer):
    """Every sample's records equal the teacher's top-k computed directly (ids exactly, values to the quantum)."""
    from transformers import AutoModelForCausalLM

    from distill.data.datasets import DataSettings, build_datasets, collate
    from distill.losses.objective import target_positions

    store = LogitStore(small_store)
    assert store.k == 16 and store.meta["samples"] == 48
    train, _ = build_datasets(DataSettings(train_file=str(train_file), eval_fraction=0.0), tokenizer, 42)
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"]).eval()
    for example in (train[0], train[13]):
        batch = collate([example], tokenizer.pad_token_id)
        with torch.no_grad():
            hidden = teacher.model(input_ids=batch["input_ids"]).last_hidden_state
        ids, values, tails = teacher_topk(hidden[target_positions(batch["labels"])], teacher.lm_head.weight, 16, 1.0, 7)
        got_ids, got_logp, got_tail = store.sample(example["sample_id"])
        order = ids.argsort(dim=1)
        np.testing.assert_array_equal(got_ids, ids.gather(1, order).numpy())
        assert np.abs(got_logp - values.gather(1, order).numpy()).max() <= 16.0 / 255 / 2 + 1e-5
        np.testing.assert_allclose(got_tail, tails.numpy(), rtol=2e-3)
        mass = np.exp(got_logp).sum(1) + np.exp(got_tail)
        np.testing.assert_allclose(mass, 1.0, atol=0.05)  # top-k plus tail is the whole distribution


def test_precompute_from_a_gguf_teacher_equals_its_model_directory(small_store, teacher_gguf, train_file, tmp_path):
    """A .gguf teacher (the same weights as model_dirs' teacher) gives the same store; the store records the file's
    own hash (it used to fail at the end hashing FILE.gguf/config.json, leaving a store every rerun redid)."""
    from kd_core.checksum import ALGORITHM, file_hash

    out = run(precompute_config({"teacher": teacher_gguf}, train_file, tmp_path / "from_gguf", k=16))
    a, b = LogitStore(small_store), LogitStore(out)
    assert b.meta["teacher"][f"file_{ALGORITHM}"] == file_hash(teacher_gguf)
    assert "config_sha256" not in b.meta["teacher"]
    assert "config_sha256" in a.meta["teacher"]
    assert sorted(a.location) == sorted(b.location) and a.meta["tokens"] == b.meta["tokens"]
    for sample_id in list(a.location)[:8]:
        (ids_a, logp_a, _), (ids_b, logp_b, _) = a.sample(sample_id), b.sample(sample_id)
        np.testing.assert_array_equal(ids_a, ids_b)
        assert np.abs(logp_a - logp_b).max() <= 16.0 / 255 + 1e-5


def test_prompts_only_data_is_refused_before_anything_is_written(model_dirs, tmp_path):
    from kd_core.config import ConfigError
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} plus 1?"} for i in range(6)])
    with pytest.raises(ConfigError, match=r"^data\.train_file: .*prompts\.jsonl: 6 of 6 examples are prompts only"):
        run(precompute_config(model_dirs, data, tmp_path / "store"))
    assert not (tmp_path / "store").exists()


def test_teacher_dtype_auto_is_bf16_on_a_bf16_gpu_and_float32_on_cpu(model_dirs, train_file, tmp_path, monkeypatch):
    from distill.offline.precompute import store_settings, teacher_dtype

    cfg = precompute_config(model_dirs, train_file, tmp_path / "s")
    assert cfg.teacher_dtype == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert teacher_dtype(cfg) == "float32" and store_settings(cfg)["teacher_dtype"] == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert teacher_dtype(cfg) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert teacher_dtype(cfg) == "float32"
    half = precompute_config(model_dirs, train_file, tmp_path / "s", teacher_dtype="float16")
    assert teacher_dtype(half) == "float16"
    with pytest.raises(ValueError, match="teacher_device_map: expected one of"):
        precompute_config(model_dirs, train_file, tmp_path / "s", teacher_device_map="everywhere")
    with pytest.raises(ValueError, match="teacher_device_map: teacher_max_memory and teacher_offload_dir need"):
        precompute_config(model_dirs, train_file, tmp_path / "s", teacher_max_memory={"cpu": "1GiB"})


def test_teacher_sharded_by_a_device_map_gives_the_same_store(small_store, model_dirs, train_file, tmp_path):
    """teacher_device_map with too little memory for the whole teacher: the layers that do not fit, the output head
    among them, are offloaded (to disk here; to the CPU or other GPUs on a GPU machine) and dispatched by
    accelerate's hooks. The store is that of the teacher on one device."""
    from accelerate.utils import has_offloaded_params

    from distill.offline.precompute import _load_teacher

    cfg = precompute_config(
        model_dirs,
        train_file,
        tmp_path / "sharded",
        teacher_device_map="auto",
        teacher_max_memory={"cpu": "600KB"},
        teacher_offload_dir=str(tmp_path / "offload"),
    )
    teacher = _load_teacher(cfg, torch.device("cpu"))
    assert has_offloaded_params(teacher.get_output_embeddings())  # the case the head is brought in batch by batch
    assert set(teacher.hf_device_map.values()) == {"cpu", "disk"}
    a, b = LogitStore(small_store), LogitStore(run(cfg))
    assert sorted(a.location) == sorted(b.location) and a.meta["tokens"] == b.meta["tokens"]
    for sample_id in a.location:
        (ids_a, logp_a, tail_a), (ids_b, logp_b, tail_b) = a.sample(sample_id), b.sample(sample_id)
        np.testing.assert_array_equal(ids_a, ids_b)
        assert np.abs(logp_a - logp_b).max() <= 16.0 / 255 + 1e-5
        np.testing.assert_allclose(tail_a, tail_b, rtol=2e-3)


def cli(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable, "-m"]) + ["distill", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)


def precompute_args(model_dirs, train_file, out) -> list[str]:
    return [
        "precompute",
        "--teacher",
        str(model_dirs["teacher"]),
        "--output_dir",
        str(out),
        "--k",
        "8",
        "--batch_size",
        "3",
        "--segment_samples",
        "10",
        "--data.train_file",
        str(train_file),
        "--data.eval_fraction",
        "0.1",
    ]


@pytest.mark.slow
def test_two_process_precompute_resumes_a_one_process_store_identically(model_dirs, train_file, tmp_path):
    """One process killed after committing 2 of 5 segments; two processes resume it (rank 0 computes segments 2 and
    4, rank 1 segment 3): the store is byte for byte the one a single uninterrupted process writes."""
    from distill.offline.segments import names
    from tests.conftest import kill_9

    one = cli(precompute_args(model_dirs, train_file, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    command = [sys.executable, "-m", "distill", *precompute_args(model_dirs, train_file, tmp_path / "two")]
    assert kill_9(command, ENV, point=f"reserve:{names(2)[2]}")
    # `--cpu --num_processes 2` would start a single process in accelerate 1.15 (no MPI hostfile): torchrun it is.
    # A free port, not torchrun's default 29500, which a launch in the other pytest-xdist worker may hold.
    launcher = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
    ]
    two = cli(precompute_args(model_dirs, train_file, tmp_path / "two"), launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "keeping 2 of 5 committed segments, computing 3" in two.stderr
    a, b = LogitStore(tmp_path / "one"), LogitStore(tmp_path / "two")
    assert len(a.meta["shards"]) == len(b.meta["shards"]) == 5
    assert sorted(a.location) == sorted(b.location) and len(a.location) == 44  # 48 rows minus int(4.8) held out
    assert a.meta["shards"] == b.meta["shards"]  # sizes and XXH3 checksums of every segment's data and index
    for number in range(5):
        for name in names(number):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    # The stores lack the held-out rows: training on every row is refused, naming the sample.
    from kd_core.config import ConfigError

    with pytest.raises(ConfigError, match="training sample .* is not in .*different eval split"):
        Distiller(train_config(model_dirs, train_file, tmp_path / "run", tmp_path / "one"))


def test_truncated_shard_and_missing_metadata_are_clear_errors(small_store, tmp_path):
    import shutil

    from kd_core.config import ConfigError

    broken = tmp_path / "broken"
    shutil.copytree(small_store, broken)
    shard = broken / LogitStore(small_store).meta["shards"][0]["data"]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ConfigError, match=f"shard {shard} has .* bytes, store.json expects"):
        LogitStore(broken)
    (broken / "store.json").unlink()
    with pytest.raises(ConfigError, match="store.json not found"):
        LogitStore(broken)


def test_shard_corrupted_in_place_is_refused_with_one_line(small_store, model_dirs, train_file, tmp_path):
    import shutil

    from distill.offline.store import DATA_HASH, INDEX_HASH
    from kd_core.config import ConfigError

    broken = tmp_path / "flipped"
    shutil.copytree(small_store, broken)
    entry = LogitStore(small_store).meta["shards"][0]
    assert len(entry[DATA_HASH]) == 32 and len(entry[INDEX_HASH]) == 32  # recorded by precompute
    shard = broken / entry["data"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"shard {shard} does not match its xxh3_128 checksum in store.json"):
        LogitStore(broken)
    result = cli(
        [
            "train",
            "--output_dir",
            str(tmp_path / "run"),
            "--report_to",
            "[none]",
            "--model.student",
            str(model_dirs["student"]),
            "--data.train_file",
            str(train_file),
            "--data.eval_fraction",
            "0",
            "--loss.teacher_store",
            str(broken),
        ]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"shard {shard} does not match" in errors[0]

    shutil.copy(small_store / entry["data"], shard)  # data repaired; now the index, same size
    index = broken / entry["index"]
    raw = bytearray(index.read_bytes())
    raw[-3] ^= 0x01
    index.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=f"shard index {index} does not match its xxh3_128 checksum"):
        LogitStore(broken)

    # A store written before checksums (no hash keys) opens on sizes alone, silently.
    meta = json.loads((broken / "store.json").read_text())
    for shard_entry in meta["shards"]:
        del shard_entry[DATA_HASH], shard_entry[INDEX_HASH]
    (broken / "store.json").write_text(json.dumps(meta))
    shutil.copy(small_store / entry["index"], index)
    assert len(LogitStore(broken).location) == len(LogitStore(small_store).location)


# ------------------------------------------------------------------------------------------------------------------
# Top-k divergences
# ------------------------------------------------------------------------------------------------------------------


def reference_bucketed(student_logits, teacher_logits, k, kind, temperature, beta=0.5, skew=0.1):
    """Direct float64 reference: collapse both softmaxes onto the teacher's top-k ids plus one tail bucket."""
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    q = torch.softmax(student_logits.double() / temperature, -1)
    ids = p.topk(k, -1).indices
    pk, qk = p.gather(1, ids), q.gather(1, ids)
    pb = torch.cat([pk, (1 - pk.sum(1, keepdim=True)).clamp_min(0)], 1)
    qb = torch.cat([qk, (1 - qk.sum(1, keepdim=True)).clamp_min(0)], 1)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(1)

    if kind == "forward_kl":
        value = kl(pb, qb)
    elif kind == "reverse_kl":
        value = kl(qb, pb)
    elif kind == "jsd":
        m = beta * pb + (1 - beta) * qb
        value = beta * kl(pb, m) + (1 - beta) * kl(qb, m)
    elif kind == "skew_forward_kl":
        value = kl(pb, skew * pb + (1 - skew) * qb)
    elif kind == "skew_reverse_kl":
        value = kl(qb, skew * qb + (1 - skew) * pb)
    else:
        value = 0.5 * (pb - qb).abs().sum(1)
    return value * temperature**2, ids


def exact_targets(teacher_logits, k, temperature):
    logp = torch.log_softmax(teacher_logits / temperature, -1)
    top, ids = logp.topk(k, -1)
    tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1)
    return TopKTargets(ids, top, tail)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_divergence_matches_direct_reference(kind):
    torch.manual_seed(0)
    student, teacher = torch.randn(11, 40) * 2, torch.randn(11, 40) * 3
    for k, temperature in ((5, 1.0), (12, 2.0)):
        expected, _ = reference_bucketed(student, teacher, k, kind, temperature)
        got = topk_per_token(student, exact_targets(teacher, k, temperature), kind, temperature=temperature)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_with_the_whole_vocabulary_is_the_full_divergence(kind):
    torch.manual_seed(1)
    student, teacher = torch.randn(7, 30), torch.randn(7, 30) * 2
    full = losses.per_token_divergence(student, teacher, kind, temperature=1.5)
    got = topk_per_token(student, exact_targets(teacher, 30, 1.5), kind, temperature=1.5)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("k, temperature", [(6, 1.0), (12, 2.0), (36, 1.5)])  # k = 36 = V: an empty tail
def test_chunked_topk_equals_unchunked_with_gradients(kind, k, temperature):
    """The kernel's gradient, computed analytically in forward, equals autograd through the direct formula."""
    torch.manual_seed(2)
    hidden = (torch.randn(13, 8) * 2).requires_grad_()
    head = torch.randn(40, 8, requires_grad=True)
    targets = exact_targets(torch.randn(13, 36) * 2, k, temperature)  # 36 < 40: a cropped padded head
    options = dict(temperature=temperature, beta=0.3, skew=0.2)
    direct = topk_per_token(hidden @ head[:36].t(), targets, kind, **options).sum()
    grads = torch.autograd.grad(direct, (hidden, head))
    chunked = chunked_topk_divergence(hidden, head, targets, kind, vocab_size=36, chunk_size=5, **options)
    chunked_grads = torch.autograd.grad(chunked * 0.5, (hidden, head))  # an upstream scale reaches both
    torch.testing.assert_close(chunked, direct, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked_grads, grads):
        torch.testing.assert_close(a, 0.5 * b, rtol=1e-4, atol=1e-5)
    assert chunked_grads[1][36:].abs().sum() == 0


def test_chunked_topk_in_bf16_follows_the_fp32_kernel():
    torch.manual_seed(3)
    hidden, head = torch.randn(9, 16), torch.randn(30, 16)
    targets = exact_targets(torch.randn(9, 30) * 2, 8, 1.0)
    low = [hidden.bfloat16().requires_grad_(), head.bfloat16().requires_grad_()]
    full = [x.bfloat16().float().requires_grad_() for x in (hidden, head)]
    value_low = chunked_topk_divergence(*low, targets, "forward_kl", chunk_size=4)
    value_full = chunked_topk_divergence(*full, targets, "forward_kl", chunk_size=4)
    value_low.backward(), value_full.backward()
    assert low[0].grad.dtype == torch.bfloat16 and low[1].grad.dtype == torch.bfloat16
    torch.testing.assert_close(value_low, value_full, rtol=2e-2, atol=1e-2)
    for a, b in zip(low, full):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------------------------------------------
# Training from the store
# ------------------------------------------------------------------------------------------------------------------


def train_config(model_dirs, train_file, out, store: Path | None, **overrides) -> TrainConfig:
    tree = {
        "output_dir": str(out),
        "max_steps": 2,
        "per_device_train_batch_size": 6,
        "learning_rate": 1e-3,
        "save_steps": 100,
        "eval_steps": None,
        "logging_steps": 1,
        "report_to": ["none"],
        "model": {"student": str(model_dirs["student"])},
        "data": {"train_file": str(train_file), "eval_fraction": 0.0},
        "loss": {"terms": {"forward_kl": 0.7, "ce": 0.3}, "chunk_size": 5},
    }
    if store is None:
        tree["model"]["teacher"] = str(model_dirs["teacher"])
    else:
        tree["loss"]["teacher_store"] = str(store)
    return nested_config(TrainConfig, tree, **overrides)


def test_training_from_exact_store_matches_online(exact_store, model_dirs, train_file, tmp_path):
    online = Distiller(train_config(model_dirs, train_file, tmp_path / "online", None))
    offline = Distiller(train_config(model_dirs, train_file, tmp_path / "offline", exact_store))
    assert offline.teacher.model is None  # the store replaces the teacher: no model is loaded
    for _ in range(2):  # the second step also checks that the first step's update was the same
        a, b = online.training_step(), offline.training_step()
        assert a.keys() == b.keys() == {"forward_kl", "ce", "loss"}
        assert b["forward_kl"] == pytest.approx(a["forward_kl"], rel=2e-3)
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)


def test_training_refuses_a_mismatched_store(small_store, model_dirs, train_file, tmp_path):
    from distill.student.tiny import tiny_llama, train_tokenizer
    from kd_core.config import ConfigError

    meta = small_store / "store.json"
    with pytest.raises(ConfigError, match="at temperature 1.0, but loss.temperature is 2.0"):
        Distiller(train_config(model_dirs, train_file, tmp_path / "a", small_store, **{"loss.temperature": 2.0}))
    with pytest.raises(ConfigError, match="tokenizes differently"):
        Distiller(
            train_config(model_dirs, train_file, tmp_path / "b", small_store, **{"data.completion_only_loss": False})
        )
    changed = tmp_path / "train_v2.jsonl"
    changed.write_text(train_file.read_text() + json.dumps({"prompt": "new", "completion": "row"}) + "\n")
    with pytest.raises(ConfigError, match=f"{meta}.*another dataset or version"):
        Distiller(train_config(model_dirs, changed, tmp_path / "d", small_store))

    other_tok = train_tokenizer(["completely different corpus of words"] * 10, vocab_size=280)
    other = tmp_path / "other_student"
    tiny_llama(len(other_tok), hidden_size=32, num_layers=1).save_pretrained(other)
    other_tok.save_pretrained(other)
    result = cli(
        [
            "train",
            "--output_dir",
            str(tmp_path / "e"),
            "--report_to",
            "[none]",
            "--model.student",
            str(other),
            "--data.train_file",
            str(train_file),
            "--loss.teacher_store",
            str(small_store),
        ]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{meta} was built with another vocabulary" in result.stderr
    assert not (tmp_path / "e" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="leave it unset with loss.teacher_store"):
        train_config(
            model_dirs, train_file, tmp_path / "f", small_store, **{"model.teacher": str(model_dirs["teacher"])}
        )


@pytest.mark.slow
def test_sigterm_and_resume_from_the_store_is_exact(small_store, model_dirs, train_file, tmp_path):
    import signal
    import time

    from safetensors.torch import load_file

    from kd_core.commands import EXIT_PREEMPTED

    def args(out: Path) -> list[str]:
        return [
            "train",
            "--output_dir",
            str(out),
            "--max_steps",
            "6",
            "--per_device_train_batch_size",
            "3",
            "--gradient_accumulation_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--logging_steps",
            "1",
            "--eval_steps",
            "null",
            "--report_to",
            "[none]",
            "--model.student",
            str(model_dirs["student"]),
            "--data.train_file",
            str(train_file),
            "--data.eval_fraction",
            "0",
            "--loss.teacher_store",
            str(small_store),
            "--loss.terms",
            "{forward_kl: 0.7, ce: 0.3}",
            "--save_steps",
            "2",
            "--save_total_limit",
            "null",
        ]

    from kd_core.config import parse_command_line

    train.run(parse_command_line(TrainConfig, args(tmp_path / "ref")[1:], "distill train"))  # in-process
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "distill", *args(out)],
        env=slowed_steps(ENV, 0.3),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "checkpoint-2").exists():
        assert process.poll() is None and time.time() < deadline, "training ended before the first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved and saved[-1] < 6
    resumed = cli([*args(out), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoint-{saved[-1]}" in resumed.stderr

    def losses_of(run_dir: Path) -> dict[int, float]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}

    assert losses_of(out).keys() == losses_of(tmp_path / "ref").keys() == set(range(1, 7))
    for step, value in losses_of(tmp_path / "ref").items():
        assert losses_of(out)[step] == pytest.approx(value, abs=1e-6), step
    ref, got = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / "ref", out))
    for name in ref:
        assert (got[name] - ref[name]).abs().max().item() <= 1e-6, name
