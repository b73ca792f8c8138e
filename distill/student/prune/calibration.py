"""Calibration data for importance estimation: the user's own jsonl, tokenised as the model will see it.

Each line holds ``messages`` (chat, template applied), ``prompt``/``completion`` (rendered as a user/assistant chat
when the tokenizer has a chat template, else concatenated) or ``text``. Only the first ``num_samples`` usable lines
are read; each is truncated to ``max_length`` tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from kd_core.config import ConfigError
from kd_core.records import iter_json_objects


@dataclass
class Calibration:
    """Padded token batches plus the facts recorded in the report."""

    input_ids: torch.Tensor  # [num_samples, max_len] right-padded
    attention_mask: torch.Tensor  # [num_samples, max_len], 1 on real tokens
    source: str
    num_tokens: int

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    def fingerprint(self) -> str:
        """Hash of exactly the tokens the model saw, so a cache entry never outlives a change of data or tokenizer."""
        digest = hashlib.sha256()
        for row, mask in zip(self.input_ids, self.attention_mask):
            digest.update(row[mask.bool()].numpy().astype("int64").tobytes())
            digest.update(b"|")
        return digest.hexdigest()[:16]

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (self.input_ids[i : i + batch_size], self.attention_mask[i : i + batch_size])
            for i in range(0, self.num_samples, batch_size)
        ]


def _render(record: dict, tokenizer: PreTrainedTokenizerBase, where: str) -> tuple[str, bool]:
    """The text of one record and whether a chat template produced it (then it already has its special tokens)."""
    has_template = bool(tokenizer.chat_template)
    if "messages" in record:
        if not has_template:
            raise ConfigError(f"{where}: 'messages' needs a tokenizer with a chat_template")
        return tokenizer.apply_chat_template(record["messages"], tokenize=False), True
    if "prompt" in record:
        completion = str(record.get("completion", ""))
        if has_template:
            chat = [{"role": "user", "content": str(record["prompt"])}]
            if completion:
                chat.append({"role": "assistant", "content": completion})
            return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=not completion), True
        return str(record["prompt"]) + completion, False
    if "text" in record:
        return str(record["text"]), False
    raise ConfigError(f"{where}: expected a 'messages', 'prompt' or 'text' field, got {sorted(record)}")


def load_calibration(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, num_samples: int, max_length: int, min_tokens: int
) -> Calibration:
    """Reads and tokenises calibration samples; ConfigError if the file is missing, empty or too short."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration.data: file not found: {path}")
    rows: list[list[int]] = []
    for number, _, record in iter_json_objects(path, label="calibration.data: "):
        if len(rows) >= num_samples:
            break
        text, templated = _render(record, tokenizer, f"calibration.data: {path}:{number}")
        # A chat template already writes the special tokens the model expects; plain text gets the tokenizer's
        # own (BOS for Llama, [CLS]/[SEP] for BERT).
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        rows.append(ids[:max_length])
    if not rows:
        raise ConfigError(f"calibration.data: {path} holds no samples")
    total = sum(len(r) for r in rows)
    if total < min_tokens:
        raise ConfigError(
            f"calibration.data: {path} gives only {total} tokens; at least calibration.min_tokens={min_tokens} "
            "are needed for stable importance estimates"
        )
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return Calibration(input_ids, attention_mask, str(path), total)
