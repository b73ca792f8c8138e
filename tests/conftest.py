"""Shared fixtures: a tokenizer trained on the fly and tiny teacher/student models saved to local directories."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FIXTURES = REPO_ROOT / "tests" / "fixtures"


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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers and process-group rendezvous in tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def addition_rows(count: int) -> list[dict[str, str]]:
    """``prompt``/``completion`` rows of small additions, of uneven lengths (padding must never count)."""
    rows = []
    for i in range(count):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}" + "." * (i % 3 + 1)})
    return rows


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    """48 addition rows: 12 optimizer steps of 4, or 6 steps of 2 processes x 4."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", addition_rows(48))


def nested_config(cls, tree: dict[str, Any], **dotted: Any):
    """``cls`` from a config tree with dotted overrides (``{"loss.terms": {...}}`` sets ``tree["loss"]["terms"]``)."""
    import copy

    from kd_core.config import from_dict

    tree = copy.deepcopy(tree)
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(cls, tree)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and symlink under ``root`` (relative path -> sha256 of its bytes, or of its link target) plus every
    directory: two equal digests mean the tree was left byte-identical."""
    import hashlib

    digest: dict[str, str] = {}
    for path in sorted(Path(root).rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            digest[name] = "link:" + str(path.readlink())
        elif path.is_file():
            digest[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[name] = "dir"
    return digest
