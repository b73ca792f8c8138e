"""Offline distillation across tokenizers: ``distill precompute --student_tokenizer`` stores the teacher's top-k in its
own vocabulary at the positions aligned with the student's counted ones; ``distill train --loss.teacher_store DIR
--loss.cross_tokenizer uld|gold`` trains from it, equal to the online cross loss when k is the whole teacher
vocabulary; a store aligned for another student, or of the other kind, is refused in one line (exit 2)."""

from __future__ import annotations

import json
import re

import pytest

from distill.offline.precompute import PrecomputeConfig, run
from distill.offline.store import TEACHER_TOKENIZER_DIR, LogitStore
from distill.training import train
from distill.training.train import Distiller
from kd_core.commands import run_command
from kd_core.config import ConfigError, from_dict
from tests.conftest import tree_digest
from tests.distill.training.test_cross_tokenizer_train import CORPUS, _config, pair  # noqa: F401 (the pair fixture)


def _precompute(pair, out, **overrides):  # noqa: F811
    tree = {
        "teacher": str(pair["teacher"]),
        "student_tokenizer": str(pair["student"]),
        "output_dir": str(out),
        "k": 8,
        "batch_size": 5,
        "data": {"train_file": str(pair["data"]), "eval_fraction": 0.0},
        **overrides,
    }
    return run(from_dict(PrecomputeConfig, tree))


@pytest.fixture(scope="module")
def stores(pair, tmp_path_factory):  # noqa: F811
    """k = 8, and k = the whole teacher vocabulary at 16-bit values (the teacher's distribution, almost exactly)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("cross_stores")
    vocab = len(AutoTokenizer.from_pretrained(pair["teacher"]))
    return {"k8": _precompute(pair, root / "k8"), "exact": _precompute(pair, root / "exact", k=vocab, value_bits=16)}


def _offline(pair, out, mode, store, **overrides):  # noqa: F811
    return _config(pair, out, mode, **{"model.teacher": None, "loss.teacher_store": str(store), **overrides})


def test_the_store_holds_the_teachers_top_k_at_the_aligned_positions(pair, stores, tmp_path):  # noqa: F811
    store = LogitStore(stores["k8"])
    meta = json.loads((stores["k8"] / "store.json").read_text())
    assert meta["student_tokenizer"]["path"] == str(pair["student"])
    assert (stores["k8"] / TEACHER_TOKENIZER_DIR / "tokenizer.json").is_file()
    distiller = Distiller(_offline(pair, tmp_path / "x", "uld", stores["k8"], max_steps=1))
    example = distiller.train_set[0]
    ids, _, _ = store.sample(example["sample_id"])
    assert ids.shape == (len(example["align_student"]), 8)  # one row per aligned pair, not per counted token
    assert store.codec.vocab == len(distiller.cross_tokenizer.tokenizer) != len(distiller.tokenizer)
    assert ids.max() >= len(distiller.tokenizer)  # the teacher's ids: past the student's vocabulary


@pytest.mark.parametrize(("mode", "kind"), [("uld", "forward_kl"), ("gold", "jsd")])
def test_with_the_whole_teacher_vocabulary_it_trains_as_the_online_loss(pair, stores, tmp_path, mode, kind):  # noqa: F811
    terms = {"loss.terms": {kind: 1.0, "ce": 0.2}, "per_device_train_batch_size": 4}
    online = Distiller(_config(pair, tmp_path / "online", mode, **terms))
    offline = Distiller(_offline(pair, tmp_path / "offline", mode, stores["exact"], **terms))
    assert offline.teacher.model is None
    for _ in range(2):  # the second step also checks that the first step's update was the same
        a, b = online.training_step(), offline.training_step()
        assert a.keys() == b.keys() == {kind, "ce", "loss"}
        assert b[kind] == pytest.approx(a[kind], rel=2e-3)


@pytest.mark.parametrize("mode", ["uld", "gold"])
def test_a_few_steps_from_a_top_k_store_lower_the_divergence(pair, stores, tmp_path, mode):  # noqa: F811
    result = train.run(_offline(pair, tmp_path / mode, mode, stores["k8"]))
    history = [h["train/forward_kl"] for h in result.summary["history"]]
    assert len(history) == 12 and history[-1] < 0.8 * history[0], history


def _argv(pair, out, store, student, *extra):  # noqa: F811
    return [
        "--output_dir",
        str(out),
        "--report_to",
        "[none]",
        "--model.student",
        str(student),
        "--data.train_file",
        str(pair["data"]),
        "--data.eval_fraction",
        "0",
        "--loss.terms",
        "{forward_kl: 1}",
        "--loss.teacher_store",
        str(store),
        *extra,
    ]


def test_a_store_of_another_student_or_kind_is_one_line_exit_2(pair, stores, tmp_path, capsys):  # noqa: F811
    from distill.student.tiny import tiny_llama, train_tokenizer

    other_tok = train_tokenizer(CORPUS, vocab_size=280)  # another student: its tokens, and so its positions, differ
    other = tmp_path / "other_student"
    tiny_llama(len(other_tok), hidden_size=32, num_layers=1).save_pretrained(other)
    other_tok.save_pretrained(other)
    same_kind = _precompute(pair, tmp_path / "plain", student_tokenizer="")  # in the teacher's vocabulary
    cases = [
        (other, ["--loss.cross_tokenizer", "uld"], stores["k8"], "was aligned for another student tokenizer"),
        (pair["student"], [], stores["k8"], r"holds the teacher's top-k in its own vocabulary .*loss\.cross_tokenizer"),
        (pair["student"], ["--loss.cross_tokenizer", "gold"], same_kind, r"holds no teacher_tokenizer/: it was not"),
    ]
    before = tree_digest(stores["k8"])
    for number, (student, extra, store, message) in enumerate(cases):
        capsys.readouterr()
        out = tmp_path / f"out{number}"
        assert run_command(train.main, [*_argv(pair, out, store, student), *extra]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and re.search(message, lines[0]), lines
        assert not (out / "metrics.jsonl").exists()
    assert tree_digest(stores["k8"]) == before
    with pytest.raises(ConfigError, match="was not precomputed across tokenizers"):
        LogitStore(same_kind).check_compatible(None, 0, 1.0, "", [], teacher_tokenizer=object())
