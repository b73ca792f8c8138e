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
EOS: it is also what on-policy training samples with (:mod:`distill.training.on_policy`). Whatever a checkpoint's
``generation_config.json`` switches on (a repetition penalty, ``min_p``, an n-gram ban, ...) is set back to neutral
there (:data:`NEUTRAL_GENERATION`): samples come from the model's own distribution at the requested temperature,
top-p and top-k, and greedy answers are the argmax of its logits, unless a ``generation_kwargs`` setting asks for a
knob by name.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    """One continuation of :func:`generate_tokens`: its tokens (the EOS included when it stopped) and whether it
    stopped at EOS."""

    tokens: list[int]
    stopped: bool


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a continuation: the tokenizer's EOS and the model's generation-config EOS ids (chat
    models often end a turn with a token of their own, e.g. SmolLM2's ``<|im_end|>``)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


# What a model's generation_config.json can switch on, each set back to its neutral value, so that a continuation is
# sampled from the model's own distribution (at the temperature / top-p / top-k asked for) and greedy decoding is the
# argmax of the raw logits. Read from transformers 5.24: every knob `GenerationMixin._get_logits_processor`
# (generation/utils.py) turns into a logits processor or warper, plus the stopping criteria and decoding strategies
# that change what is generated. A checkpoint's file can set any of them (Qwen2.5 Instruct ships
# repetition_penalty 1.05-1.1); `generate` fills whatever a call leaves unset from that file.
NEUTRAL_GENERATION: dict[str, Any] = {
    # logits processors (generation/utils.py `_get_logits_processor`, in its order)
    "guidance_scale": None,
    "sequence_bias": None,
    "encoder_repetition_penalty": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    # sampling warpers besides temperature / top_p / top_k (which every call sets)
    "top_h": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "watermarking_config": None,
    "renormalize_logits": False,
    # stopping criteria and decoding strategies other than plain sampling / greedy search
    "max_time": None,
    "stop_strings": None,
    "num_beams": 1,
    "num_return_sequences": 1,
    "num_beam_groups": None,
    "diversity_penalty": None,
    "penalty_alpha": None,
    "dola_layers": None,
    "low_memory": None,
    "prompt_lookup_num_tokens": None,
    "assistant_early_exit": None,
}
# Set by generate_tokens itself (from its arguments), so a `generation_kwargs` field may not set them.
OWN_GENERATION_KEYS = frozenset(
    {
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "max_new_tokens",
        "max_length",
        "pad_token_id",
        "eos_token_id",
        "return_dict_in_generate",
        "synced_gpus",
    }
)


def generation_fields() -> set[str]:
    """The settings a ``GenerationConfig`` of the installed transformers has (what ``generation_kwargs`` may set)."""
    from transformers import GenerationConfig

    return set(vars(GenerationConfig()))


def check_generation_kwargs(kwargs: Mapping[str, Any], field: str) -> None:
    """ValueError naming ``field`` unless every key is a GenerationConfig setting that generate_tokens leaves free."""
    if not kwargs:
        return
    own = sorted(set(kwargs) & OWN_GENERATION_KEYS)
    if own:
        raise ValueError(
            f"{field}.{own[0]}: set by its own option (temperature, top_p, top_k, max_new_tokens), "
            "not through generation_kwargs"
        )
    unknown = sorted(set(kwargs) - generation_fields())
    if unknown:
        raise ValueError(
            f"{field}.{unknown[0]}: not a transformers GenerationConfig setting (expected e.g. "
            "repetition_penalty, min_p, no_repeat_ngram_size)"
        )


def neutral_generation(generation_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`NEUTRAL_GENERATION` for the installed transformers (a knob it does not have is left out: generate
    would pass an unknown keyword on to the model's forward) with the user's ``generation_kwargs`` on top."""
    fields = generation_fields()
    return {k: v for k, v in NEUTRAL_GENERATION.items() if k in fields} | dict(generation_kwargs or {})


def left_padded(prompts: Sequence[list[int]], pad_token_id: int):
    """``input_ids`` and ``attention_mask`` [B, longest prompt], the prompts aligned to the right."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def generate_tokens(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    *,
    pad_token_id: int,
    eos_token_ids: Collection[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generation_kwargs: Mapping[str, Any] | None = None,
    synced_gpus: bool = False,
) -> list[TokenSample]:
    """One batch of continuations of ``prompts`` (token ids), in their order.

    The prompts are left-padded (each continuation is then the one the prompt gets alone, thanks to the attention
    mask) and generated with the KV cache; ``temperature`` > 0 samples with ``top_p`` / ``top_k`` (0 = no top-k)
    from torch's global generator, 0 is greedy. Every other knob of the model's generation config is neutral
    (:data:`NEUTRAL_GENERATION`) unless ``generation_kwargs`` sets it. Each continuation is cut after its first
    token in ``eos_token_ids``. ``synced_gpus``: under ZeRO-3 with partitioned weights, every rank runs the same
    number of forward passes until all have finished (transformers' generate option).
    """
    import torch

    input_ids, attention_mask = left_padded(prompts, pad_token_id)
    device = next(model.parameters()).device
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            **neutral_generation(generation_kwargs),
            do_sample=sample,
            # None when greedy: transformers 5.24 warns about sampling settings given to greedy search.
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=top_k if sample else None,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=list(eos_token_ids) or None,
            return_dict_in_generate=True,
            synced_gpus=synced_gpus,
        )
    eos = set(eos_token_ids)
    samples = []
    for tokens in out.sequences[:, input_ids.shape[1] :].tolist():
        # Finished rows are filled with padding up to the longest continuation of the batch: cut after EOS.
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), None)
        samples.append(TokenSample(tokens if end is None else tokens[:end], end is not None))
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
    generation_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[Generation], float]:
    """Answers to ``prompts`` (token ids from :func:`encode_prompt`), in their order, and the seconds spent in
    ``model.generate``.

    ``temperature`` > 0 samples (with ``top_p``); 0 is greedy; ``generation_kwargs``: see :func:`generate_tokens`.
    ``seed`` seeds torch's global generator once, before the first batch. Without a pad token, the EOS token pads
    (the attention mask hides it).
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
            model,
            [list(prompts[i]) for i in rows],
            pad_token_id=pad,
            eos_token_ids=stop_token_ids(model, tokenizer),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generation_kwargs=generation_kwargs,
        )
        seconds += time.perf_counter() - began
        for row, sample in zip(rows, samples):
            tokens = sample.tokens[:-1] if sample.stopped else sample.tokens
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            by_row[row] = Generation(text, len(prompts[row]), len(tokens), sample.stopped)
    return [by_row[i] for i in range(len(prompts))], seconds
