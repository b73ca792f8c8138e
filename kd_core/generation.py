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

Both rest on :func:`generate_tokens`, one left-padded batch through ``model.generate`` returning token ids cut after
EOS (and, when asked, each sampled token's log-probability under the model): it is also what on-policy training
samples with (:mod:`distill.training.on_policy`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
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


@dataclass
class TokenSample:
    """One continuation of :func:`generate_tokens`: its tokens (the EOS included when it stopped), whether it
    stopped at EOS, and the sum of its tokens' log-probabilities under the model (T = 1; None unless asked)."""

    tokens: list[int]
    stopped: bool
    logprob: float | None = None


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a continuation: the tokenizer's EOS and the model's generation-config EOS ids (chat
    models often end a turn with a token of their own, e.g. SmolLM2's ``<|im_end|>``)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate_tokens(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    *,
    pad_token_id: int,
    eos_token_ids: Collection[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    logprobs: bool = False,
    synced_gpus: bool = False,
) -> list[TokenSample]:
    """One batch of continuations of ``prompts`` (token ids), in their order.

    The prompts are left-padded (each continuation is then the one the prompt gets alone, thanks to the attention
    mask) and generated with the KV cache; ``temperature`` > 0 samples with ``top_p`` / ``top_k`` (0 = no top-k) from
    torch's global generator (``top_k`` None: the model's generation config default), 0 is greedy. Each continuation is cut after its first token in ``eos_token_ids``.
    ``logprobs`` keeps the model's raw logits of every step (batch x vocabulary floats per new token) to sum the
    chosen tokens' log-probabilities. ``synced_gpus``: under ZeRO-3 with partitioned weights, every rank runs the
    same number of forward passes until all have finished (transformers' generate option).
    """
    import torch

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=top_k if sample else None,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=list(eos_token_ids) or None,
            return_dict_in_generate=True,
            output_logits=logprobs,
            synced_gpus=synced_gpus,
        )
    new = out.sequences[:, width:]
    chosen = None
    if logprobs:  # [B, new]: log-softmax of the raw logits at each step, at the token that was chosen
        logits = torch.stack(out.logits, dim=1).float()
        chosen = torch.log_softmax(logits, dim=-1).gather(-1, new[:, : logits.shape[1], None]).squeeze(-1)
    eos = set(eos_token_ids)
    samples = []
    for row, tokens in enumerate(new.tolist()):
        # Finished rows are filled with padding up to the longest continuation of the batch: cut after EOS.
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), None)
        kept = tokens if end is None else tokens[:end]
        logprob = float(chosen[row, : len(kept)].sum()) if chosen is not None else None
        samples.append(TokenSample(kept, end is not None, logprob))
    return samples


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
    the first batch. Without a pad token, the EOS token pads (the attention mask hides it).
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: equal lengths keep their order
    by_row: dict[int, Generation] = {}
    seconds = 0.0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        began = time.perf_counter()
        samples = generate_tokens(
            model, [list(prompts[i]) for i in rows], pad_token_id=pad, eos_token_ids=stop_token_ids(model, tokenizer),
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        )
        seconds += time.perf_counter() - began
        for row, sample in zip(rows, samples):
            tokens = sample.tokens[:-1] if sample.stopped else sample.tokens
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            by_row[row] = Generation(text, len(prompts[row]), len(tokens), sample.stopped)
    return [by_row[i] for i in range(len(prompts))], seconds
