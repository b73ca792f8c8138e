"""The student as the draft model of speculative decoding for its teacher (DistillSpec's use of a distilled student).

:func:`draft_metrics` generates greedily with the teacher from each prompt twice, one prompt at a time (assisted
generation takes batch 1): alone, and with the student as ``assistant_model`` (transformers assisted generation,
5.24: the student drafts a few tokens, the teacher checks them in one forward pass and keeps the longest agreeing
prefix plus one token of its own; it adapts the draft length and confidence threshold of the student's
``generation_config`` from call to call, so later prompts draft with what earlier ones learnt). The order of the two
alternates from prompt to prompt so that drift in the machine's speed does not favour either. Figures:

* **acceptance_rate**: draft tokens the teacher kept over draft tokens proposed, both in the teacher's tokens. Counted
  with forward pre-hooks (public torch API, no transformers internals): every teacher forward pass of the assisted
  generation adds the drafts it accepted plus one token of its own, so ``accepted = new tokens - teacher passes``;
  the drafts proposed are the positions the teacher scored that were neither prompt nor its own tokens (below).
* **tokens_per_teacher_pass**: new tokens per teacher forward pass in the assisted generation (1.0 without a draft).
* **speedup**: seconds of the plain greedy generations over seconds of the assisted ones (same prompts, same
  ``max_new_tokens``); above 1 the student makes the teacher faster.
* **assisted_equal**: fraction of prompts whose assisted continuation equals the teacher's plain greedy one token
  for token. Greedy assisted decoding is lossless, so this is 1.0 up to float rounding between verifying several
  tokens in one pass and one at a time.

**Across tokenizers** (``tokenizer`` and ``assistant_tokenizer`` given): transformers' universal assisted generation
(5.24, ``AssistedCandidateGeneratorDifferentTokenizers`` at greedy): each round decodes the teacher's tokens to text,
re-encodes it for the student, lets the student draft in its own vocabulary and re-encodes the draft for the teacher.
Student passes then no longer count the teacher's candidates, so the drafts are counted where the teacher reads them:
every position a teacher pass scores is a prompt token, a draft token or the teacher's own token of the previous pass
fed back (its key/value cache holds the rest), so ``proposed = positions - prompt - (passes - 1)``; the same identity
gives the student-pass count when the tokenizers agree (tested). Prompts are the teacher's token ids.

Without generating anything, :func:`expected_tokens_per_round` turns the eval pass's ``alpha`` (one minus the mean
total variation between the two models' next-token distributions, :mod:`distill.evaluation.metrics`) into the tokens
one round of speculative *sampling* yields with ``gamma`` draft tokens (Leviathan et al. 2023, eq. 1; DistillSpec).
It predicts sampling at temperature 1, where a draft token is accepted with probability min(1, p_teacher / p_draft);
the measured figures above are greedy, where a token is accepted only when both argmaxes agree, so the two differ.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kd_core.config import option

# torch is imported where it is used: `distill eval --help` reads DraftSettings and should not pay for it.
if TYPE_CHECKING:
    from torch import nn


@dataclasses.dataclass
class DraftSettings:
    """Bounds on the cost of the speculative-decoding figures (each prompt is generated twice by the teacher)."""

    num_prompts: int = option(
        8, help="Prompts (the first ones with a prompt) generated plain and assisted; 0 = skip the draft-model figures."
    )
    max_new_tokens: int = option(64, help="Greedy tokens per prompt in both generations.")
    gamma: int = option(
        5, help="Draft tokens per round for the expected tokens per round predicted from alpha (no generation)."
    )

    def __post_init__(self) -> None:
        if self.num_prompts < 0:
            raise ValueError(f"num_prompts: expected >= 0, got {self.num_prompts}")
        if self.gamma < 1:
            raise ValueError(f"gamma: expected >= 1, got {self.gamma}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """Expected tokens one speculative round yields, the teacher's own token included: ``(1 - alpha**(gamma + 1)) /
    (1 - alpha)``, each of the ``gamma`` draft tokens accepted with probability ``alpha`` independently (Leviathan et
    al. 2023); ``gamma + 1`` at alpha = 1 (the limit), 1 at alpha = 0."""
    if not -1e-6 <= alpha <= 1.0 + 1e-6 or gamma < 1:  # float sums may step just outside [0, 1]
        raise ValueError(f"alpha: expected a number in [0, 1] and gamma >= 1, got {alpha} and {gamma}")
    alpha = min(max(alpha, 0.0), 1.0)
    # Summed as a geometric series: the closed form divides 0 by 0 at alpha = 1 and loses digits just below it.
    return sum(alpha**i for i in range(gamma + 1))


class ForwardCounter:
    """Counts a module's forward calls and the input positions they score (a forward pre-hook) while active;
    ``positions`` is None once a call came without ``input_ids`` (embeddings only: positions unknown)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.positions: int | None = 0
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.positions = None if ids is None or self.positions is None else self.positions + ids.shape[-1]

    def remove(self) -> None:
        self._handle.remove()


def _greedy(
    teacher: nn.Module, prompt: list[int], max_new_tokens: int, pad: int, eos: int, assistant: nn.Module | None, **tok
) -> tuple[list[int], float]:
    """New tokens (uncut: what the rounds produced) and the wall seconds of one greedy ``generate``; ``tok`` holds
    ``tokenizer`` and ``assistant_tokenizer`` for universal assisted generation, else nothing."""
    import torch

    device = next(teacher.parameters()).device
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    began = time.perf_counter()
    with torch.no_grad():
        out = teacher.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            assistant_model=assistant,
            **(tok if assistant is not None else {}),
        )
    return out[0, len(prompt) :].tolist(), time.perf_counter() - began


def _cut(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def draft_metrics(
    student: nn.Module,
    teacher: nn.Module,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int,
    tokenizer: Any = None,
    assistant_tokenizer: Any = None,
) -> dict[str, Any]:
    """The figures of the module docstring for ``student`` drafting for ``teacher`` on ``prompts`` (the teacher's token
    ids from :func:`kd_core.generation.encode_prompt`); ``tokenizer`` (the teacher's) and ``assistant_tokenizer`` (the
    student's) when the two differ: universal assisted generation."""
    tok = {"tokenizer": tokenizer, "assistant_tokenizer": assistant_tokenizer} if tokenizer is not None else {}
    plain_s = assisted_s = 0.0
    new_tokens = teacher_passes = proposed = student_passes = equal = 0
    for i, prompt in enumerate(prompts):
        runs = {}
        for assisted in (False, True) if i % 2 == 0 else (True, False):
            if not assisted:
                runs[False] = _greedy(teacher, prompt, max_new_tokens, pad_token_id, eos_token_id, None)
                continue
            teacher_count, student_count = ForwardCounter(teacher), ForwardCounter(student)
            try:
                runs[True] = _greedy(teacher, prompt, max_new_tokens, pad_token_id, eos_token_id, student, **tok)
            finally:
                teacher_count.remove()
                student_count.remove()
            new_tokens += len(runs[True][0])
            teacher_passes += teacher_count.calls
            student_passes += student_count.calls
            if proposed is not None and teacher_count.positions is not None:
                proposed += teacher_count.positions - len(prompt) - (teacher_count.calls - 1)
            else:
                proposed = None
        plain_s += runs[False][1]
        assisted_s += runs[True][1]
        equal += _cut(runs[False][0], eos_token_id) == _cut(runs[True][0], eos_token_id)
    accepted = new_tokens - teacher_passes
    return {
        "draft_prompts": len(prompts),
        "draft_tokenizer": "teacher's and student's" if tok else "shared",
        "acceptance_rate": accepted / proposed if proposed else None,
        "tokens_per_teacher_pass": new_tokens / teacher_passes if teacher_passes else None,
        "speedup": plain_s / assisted_s if assisted_s > 0 else None,
        "plain_seconds": plain_s,
        "assisted_seconds": assisted_s,
        "assisted_equal": equal / len(prompts) if prompts else None,
        "draft_tokens_proposed": proposed,
        "student_passes": student_passes,
    }
