"""Packing: a micro-batch's examples laid into as few rows as their cost allows, each example attending to itself only.

Rows are chosen by first-fit decreasing into rows of at most ``max_length`` tokens, or fewer balanced longer rows where
the model's shape makes them cheaper (:func:`packing_rows`); :func:`collate_packed` builds the batch, with
``position_ids`` that restart for each example (flash kernels read them as varlen boundaries, the others get the
block-diagonal mask, :func:`varlen_attention`).
"""

from __future__ import annotations

from typing import Any

import torch

from distill.data.datasets import IGNORE_INDEX


def pack_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """First-fit decreasing: example indices grouped into rows of at most ``capacity`` tokens (None: one row).
    Rows are bounded so attention, quadratic in a row's length, stays that of ``max_length``-long sequences; an
    example longer than ``capacity`` gets a row of its own."""
    longest_first = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if capacity is None:
        return [longest_first]
    rows: list[list[int]] = []
    room: list[int] = []
    for index in longest_first:
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def attention_weight(config) -> float:
    """Cost of one query-key pair in attention relative to one token through the layer's matmuls, for a decoder
    config (forward FLOPs per layer; backward scales both alike): QK^T and AV take 4 x heads x head_dim per pair,
    the q/k/v/o projections and the gated MLP 2 x (hidden x (2 q + 2 kv widths) + 3 x hidden x intermediate) per
    token. SmolLM2-135M: 1 / 3,070 (its half-width-MLP pruned student 1 / 2,300), so rows of a few thousand tokens
    cost little attention; Llama-3-8B: 1 / 26,600."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 2 * (hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 3 * hidden * intermediate)
    return 4 * heads * head_dim / per_token


def balanced_rows(lengths: list[int], count: int) -> list[list[int]]:
    """Example indices in ``count`` rows of near-equal length: longest first, each into the shortest row so far."""
    rows: list[list[int]] = [[] for _ in range(count)]
    filled = [0] * count
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = filled.index(min(filled))
        rows[row].append(index)
        filled[row] += lengths[index]
    return [row for row in rows if row]


def packing_rows(lengths: list[int], max_length: int | None, weight: float | None) -> list[list[int]]:
    """The rows :func:`collate_packed` uses: first-fit decreasing into rows of ``max_length`` tokens or, where a
    balanced packing into fewer, longer rows costs less, that one. Cost = ``rows x width`` tokens (padding
    included) + ``weight x rows x width^2`` attention pairs. Rows of ``max_length`` when ``weight`` is None; one
    row when ``max_length`` is None."""
    rows = pack_rows(lengths, max_length)
    if max_length is None or weight is None:
        return rows

    def cost(rows: list[list[int]]) -> float:
        width = max(sum(lengths[i] for i in row) for row in rows)
        return len(rows) * width * (1 + weight * width)

    fewer = [balanced_rows(lengths, count) for count in range(1, len(rows))]
    return min([rows, *fewer], key=cost)  # ties keep the max_length rows


def varlen_attention(attn_implementation: str) -> bool:
    """Whether packed rows go to the model as one flat row: transformers 5.24's flash-attention path reads packed
    sequences from position ids (``flash_attn_varlen_func`` on ``cu_seqlens``, no mask) only for a batch of one row
    (``modeling_flash_attention_utils._is_packed_sequence``); several rows would attend across examples. sdpa, eager
    and flex_attention build a block-diagonal mask from the position ids of any number of rows
    (``masking_utils.find_packed_sequence_indices``)."""
    return attn_implementation.startswith("flash_attention")


def collate_packed(
    examples: list[dict[str, Any]],
    pad_token_id: int,
    max_length: int | None = None,
    weight: float | None = None,
    varlen: bool = False,
) -> dict[str, torch.Tensor]:
    """Examples back to back in rows chosen by :func:`packing_rows` (first-fit decreasing into rows of ``max_length``
    tokens, or fewer, longer rows where ``weight``, the student's :func:`attention_weight`, says they are cheaper),
    padded only to the longest row: ``position_ids`` restart at 0 for each example, from which transformers (5.24
    ``masking_utils.find_packed_sequence_indices``, used when the attention mask is None) builds a block-diagonal causal
    mask, so each example attends to itself only, as if padded. A padding token has position 0 (a sequence of its own),
    label -100 and loss weight 0. The first token of each example is never a target (its label is set to -100), so no
    example predicts the next one's start. ``sample_ids`` follow the packed order (row by row), as the offline store's
    targets must. ``attention_mask`` marks the real tokens; the trainer passes None to the models when ``position_ids``
    is present. ``varlen`` (:func:`varlen_attention`): every example in one row, no padding."""
    lengths = [len(e["input_ids"]) for e in examples]
    rows = [list(range(len(examples)))] if varlen else packing_rows(lengths, max_length, weight)
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    loss_weights = torch.zeros(shape, dtype=torch.float32)  # per token: a row holds examples with their own `ce` weight
    order = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            example, n = examples[i], len(examples[i]["input_ids"])
            span = slice(start, start + n)
            input_ids[r, span] = torch.tensor(example["input_ids"])
            labels[r, span] = torch.tensor([IGNORE_INDEX] + list(example["labels"][1:]))
            positions[r, span] = torch.arange(n)
            attention_mask[r, span] = 1
            loss_weights[r, span] = example.get("loss_weight", 1.0)
            order.append(example["sample_id"])
            start += n
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": positions,
        "sample_ids": torch.tensor(order, dtype=torch.long),
        "loss_weights": loss_weights,
    }
