"""Batched generation with a local causal LM: the one loop behind ``distill eval``, the trainer's answer-accuracy
metric and ``data-gen``'s local teacher backend.

:func:`encode_prompt` turns a prompt into token ids: chat messages through the tokenizer's chat template, a plain
string through it as a single user turn when the tokenizer has one (as training on ``prompt``/``completion`` data
does), else tokenized as is. :func:`generate_batched` generates from many such prompts: sorted by length (length
bucketing, so little padding is generated), ``batch_size`` at a time, left-padded (every prompt then ends at the same
position and generation continues right after it; with the attention mask each continuation is the one the prompt
gets alone), greedy unless a temperature is given. Each answer is cut at the first EOS token and decoded without
special tokens; it comes back with its prompt and answer token counts, in the order of the prompts, together with
the wall time spent in ``model.generate`` (what tokens-per-second figures divide by).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported where it is used: data_gen.backends imports this module, and a data-gen run against an API
# teacher (or `--help`) should not pay for importing torch.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Messages = list[dict[str, str]]


@dataclass
class Generation:
    """One answer: its text and token counts, and whether it ended with EOS (else it ran to ``max_new_tokens``)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    stopped: bool


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages) -> list[int]:
    """Token ids of ``prompt`` ready for generation (chat template with the generation prompt where one applies)."""
    if isinstance(prompt, list) or tokenizer.chat_template is not None:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        # transformers 5.23 returns a BatchEncoding unless return_dict=False.
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        ids = tokenizer(prompt)["input_ids"]
    return list(ids)


def generate_batched(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> tuple[list[Generation], float]:
    """Answers to ``prompts`` (token ids from :func:`encode_prompt`), in their order, and the seconds spent in
    ``model.generate``.

    ``temperature`` > 0 samples (with ``top_p``); 0 is greedy. ``seed`` seeds torch's global generator once, before
    the first batch. The tokenizer needs a pad token (``tokenizer.pad`` refuses to pad without one); its padding side
    is set to left for the call and restored afterwards.
    """
    import torch

    sample = temperature > 0
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: equal lengths keep their order
    by_row: dict[int, Generation] = {}
    seconds = 0.0
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [list(prompts[i]) for i in rows]}, return_tensors="pt").to(device)
            began = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=top_p if sample else None,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                )
            seconds += time.perf_counter() - began
            for row, tokens in zip(rows, out[:, batch["input_ids"].shape[1] :].tolist()):
                # Finished rows are filled with padding up to the longest answer of the batch: cut at EOS.
                stopped = eos in tokens
                if stopped:
                    tokens = tokens[: tokens.index(eos)]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                by_row[row] = Generation(text, len(prompts[row]), len(tokens), stopped)
    finally:
        tokenizer.padding_side = side
    return [by_row[i] for i in range(len(prompts))], seconds
