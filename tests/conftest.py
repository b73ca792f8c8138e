"""Shared fixtures: a tokenizer trained on the fly and tiny teacher/student models saved to local directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def slowed_steps(env: dict[str, str], seconds: float) -> dict[str, str]:
    """``env`` for a subprocess whose trainer sleeps ``seconds`` after each optimizer step (tests/slow_steps), so a
    test can signal it between two checkpoints however fast the machine."""
    paths = [str(REPO_ROOT / "tests" / "slow_steps"), str(REPO_ROOT), env.get("PYTHONPATH", "")]
    return {**env, "SLOW_STEP_SECONDS": str(seconds), "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 7? The answer is 19.",
    "Translate the sentence into French: good morning.",
    "Write a short poem about the sea and the wind.",
    "Tom has 3 apples and buys 4 more, so he has 7 apples.",
    "List three colors: red, green, blue.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    from distill.student.tiny import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """A 4-layer teacher and a 2-layer student (same tokenizer) saved with ``save_pretrained``."""
    from distill.student.tiny import tiny_llama

    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, layers, hidden in (("teacher", 4, 64), ("student", 2, 32)):
        model = tiny_llama(len(tokenizer), hidden_size=hidden, num_layers=layers, seed=layers)
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
