"""Which student layer learns from which teacher layer.

Layers are numbered from 0 (the first transformer block) as in ``layer_idx``; negative numbers count from the end
(-1 is the last layer). In a Hugging Face output, layer ``i`` is ``hidden_states[i + 1]`` and ``attentions[i]``;
``hidden_states[0]`` is the embedding output, which :func:`layer_pairs` adds as the pair ``(EMBEDDINGS, EMBEDDINGS)``
when asked. Note that decoders' last hidden state is taken after the final norm (transformers ties it to
``last_hidden_state``), BERT's after the last block's own LayerNorm.
"""

from __future__ import annotations

from kd_core.config import ConfigError

EMBEDDINGS = -100  # marker for the embedding output in a layer pair (never a valid layer index)


def resolve_layer(index: int, num_layers: int, what: str) -> int:
    """A possibly negative layer index as 0-based, or ConfigError naming ``what`` and the valid range."""
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise ConfigError(
            f"{what}: layer {index} does not exist (the model has {num_layers} layers: 0..{num_layers - 1})"
        )
    return resolved


def uniform_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """PKD-Skip: student layer i learns from teacher layer ``(i + 1) * T // S - 1``; the last layers align."""
    if student_layers > teacher_layers:
        raise ConfigError(
            f"layer_map: uniform needs at most as many student layers as teacher layers "
            f"(student {student_layers}, teacher {teacher_layers}); use layer_map: explicit"
        )
    return [(i, (i + 1) * teacher_layers // student_layers - 1) for i in range(student_layers)]


def last_k_pairs(student_layers: int, teacher_layers: int, k: int) -> list[tuple[int, int]]:
    """PKD-Last: the student's last k layers learn from the teacher's last k layers, in order (k=0: all student
    layers)."""
    k = k or student_layers
    if k > min(student_layers, teacher_layers):
        raise ConfigError(
            f"last_k: {k} layers requested but the student has {student_layers} and the teacher {teacher_layers}"
        )
    return [(student_layers - k + i, teacher_layers - k + i) for i in range(k)]


def explicit_pairs(layers: list[list[int]], student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """The user's ``[[student_layer, teacher_layer], ...]`` list, validated against both models."""
    if not layers:
        raise ConfigError("layers: layer_map is 'explicit' but no [student_layer, teacher_layer] pairs are given")
    pairs = []
    for n, pair in enumerate(layers):
        if len(pair) != 2:
            raise ConfigError(f"layers[{n}]: expected [student_layer, teacher_layer], got {pair}")
        student = resolve_layer(pair[0], student_layers, f"layers[{n}] student")
        teacher = resolve_layer(pair[1], teacher_layers, f"layers[{n}] teacher")
        pairs.append((student, teacher))
    return pairs


def layer_pairs(
    strategy: str,
    student_layers: int,
    teacher_layers: int,
    *,
    layers: list[list[int]] | None = None,
    last_k: int = 0,
    include_embeddings: bool = False,
) -> list[tuple[int, int]]:
    """The mapped ``(student_layer, teacher_layer)`` pairs, the embedding pair first when included."""
    if strategy == "uniform":
        pairs = uniform_pairs(student_layers, teacher_layers)
    elif strategy == "last_k":
        pairs = last_k_pairs(student_layers, teacher_layers, last_k)
    elif strategy == "explicit":
        pairs = explicit_pairs(layers or [], student_layers, teacher_layers)
    else:
        raise ConfigError(f"layer_map: expected 'uniform', 'last_k' or 'explicit', got {strategy!r}")
    return ([(EMBEDDINGS, EMBEDDINGS)] if include_embeddings else []) + pairs


def hidden_index(layer: int) -> int:
    """Position of a layer (or the embeddings) in a Hugging Face ``hidden_states`` tuple."""
    return 0 if layer == EMBEDDINGS else layer + 1
