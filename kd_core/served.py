"""A served teacher's next-token log-probabilities of GIVEN token ids, from an OpenAI-compatible server.

vLLM (and SGLang) score a prompt without generating it: ``POST /v1/completions`` with ``prompt`` a list of token ids
and ``prompt_logprobs: k`` returns, for every prompt position after the first, the ``k`` most likely next tokens
with their log-probabilities (plus the prompt's own token when it is not among them). Sending ids, not text, means
nothing is re-tokenized: position ``t`` of the answer is exactly the distribution after the ids ``0..t`` the
trainer has. vLLM 0.32 computes these log-probabilities in float32 from the raw logits (its default
``--logprobs-mode raw_logprobs``), before any sampling setting, so they are the model's own distribution at
temperature 1. The server must have been started with ``--max-logprobs`` >= k.

:class:`PromptScorer` makes one such call (errors mapped onto :mod:`kd_core.remote`'s two kinds, retries left to
:func:`kd_core.retry.call_with_retries`) and :func:`check_tokenizer` proves, on a probe text, that the server
tokenizes as the trainer's tokenizer does before any row is scored: the ids it is sent are only meaningful then.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kd_core.config import ConfigError
from kd_core.remote import FatalError, TransientError, openai_errors, resolve_api_key, split_query

# Digits split differently by different tokenizers, accents, CJK, an emoji, code, tabs and newlines: two tokenizers
# that agree on this text agree on nearly everything a dataset holds.
PROBE_TEXT = (
    "Probe 1: 12345 + 678 = 13023; 3.14159 ≈ π. Naïve café — 東京 ✓ 🙂\n"
    "\tdef f(x):\n        return x ** 2  # <tag> 'quote' \"dq\" e.g. U.S.A. 1,000,000"
)


@dataclass
class PromptLogprobs:
    """The server's top-k after each prefix of one prompt: row ``t`` is the distribution after ids ``0..t``
    (predicting id ``t + 1``), columns in the server's rank order."""

    ids: np.ndarray  # int64 [n - 1, k]
    logprobs: np.ndarray  # float32 [n - 1, k]
    prompt_tokens: int

    @property
    def log_tail(self) -> np.ndarray:
        """log of the probability outside the top k at each position (float32 [n - 1]; -inf when none is left)."""
        mass = np.exp(self.logprobs.astype(np.float64)).sum(axis=1)
        with np.errstate(divide="ignore"):
            return np.log(np.clip(1.0 - mass, 0.0, None)).astype(np.float32)


def parse_prompt_logprobs(entries: Any, token_ids: Sequence[int], k: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, logprobs) of a ``prompt_logprobs`` answer for ``token_ids``; FatalError naming ``where`` when the
    answer has another number of positions or fewer than ``k`` candidates at a position (the server's
    ``--max-logprobs`` is lower than ``k``: retrying cannot help)."""
    n = len(token_ids)
    if not isinstance(entries, list):
        raise TransientError("malformed", f"{where}: answer without prompt_logprobs (got {type(entries).__name__})")
    if len(entries) != n:
        raise FatalError(f"{where}: the server scored {len(entries)} positions for a prompt of {n} token ids")
    ids = np.empty((max(n - 1, 0), k), dtype=np.int64)
    logprobs = np.empty((max(n - 1, 0), k), dtype=np.float32)
    for t, entry in enumerate(entries[1:]):
        if not isinstance(entry, dict):
            raise TransientError("malformed", f"{where}: position {t + 1} has no log-probabilities")
        top = sorted(
            ((int(value["rank"]), int(token), float(value["logprob"])) for token, value in entry.items()),
            key=lambda item: item[0],
        )
        top = [item for item in top if item[0] <= k]
        if len(top) < k:
            raise FatalError(
                f"{where}: the server returned {len(top)} log-probabilities at position {t + 1}, {k} were asked "
                "(start it with --max-logprobs >= k)"
            )
        for column, (_, token, logprob) in enumerate(top[:k]):
            ids[t, column] = token
            logprobs[t, column] = logprob if math.isfinite(logprob) else -1.0e4
    return ids, logprobs


class PromptScorer:
    """One teacher behind an OpenAI-compatible ``/v1/completions`` endpoint (openai 3.60's async client; its own
    retries off, since :func:`kd_core.retry.call_with_retries` owns them)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        timeout_s: float = 600.0,
        field: str = "teacher_url",
    ) -> None:
        import openai

        # The HTTP client logs every request's URL at INFO (httpx2 2.16, under openai 3.57): with credentials in it.
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        base_url, query = split_query(url)
        self.model = model
        self.field = field
        self.client = openai.AsyncOpenAI(
            api_key=resolve_api_key(api_key_env, field.rsplit("_", 1)[0] + "_api_key_env"),
            base_url=base_url,
            timeout=timeout_s,
            max_retries=0,
            default_query=query or None,
        )

    async def score(self, token_ids: Sequence[int], k: int, where: str) -> PromptLogprobs:
        """The top-``k`` next-token log-probabilities after every prefix of ``token_ids``."""
        body = {
            "model": self.model,
            "prompt": [int(i) for i in token_ids],
            "max_tokens": 1,  # vLLM 0.32 refuses 0; one generated token is the price of a scoring call
            "temperature": 0.0,
            "prompt_logprobs": k,
        }
        with openai_errors():
            answer = await self.client.post("/completions", body=body, cast_to=dict)
        try:
            choice = answer["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise TransientError("malformed", f"{where}: answer without choices: {str(answer)[:200]}") from None
        ids, logprobs = parse_prompt_logprobs(choice.get("prompt_logprobs"), token_ids, k, where)
        usage = answer.get("usage") or {}
        return PromptLogprobs(ids, logprobs, int(usage.get("prompt_tokens") or len(token_ids)))

    async def tokenize(self, text: str) -> list[int]:
        """The server's own token ids of ``text`` (special tokens included, as it encodes a text prompt), read back
        from an echoed completion with ``return_tokens_as_token_ids`` (vLLM, SGLang)."""
        body = {
            "model": self.model,
            "prompt": text,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        with openai_errors():
            answer = await self.client.post("/completions", body=body, cast_to=dict)
        try:
            choice = answer["choices"][0]
            tokens = choice["logprobs"]["tokens"]
            generated = int((answer.get("usage") or {}).get("completion_tokens", 1))
            ids = [int(str(token).removeprefix("token_id:")) for token in tokens]
        except (KeyError, IndexError, TypeError, ValueError):
            raise FatalError(
                f"{self.field}: the server does not return the token ids of an echoed prompt "
                "(needs an OpenAI-compatible server with echo and return_tokens_as_token_ids, such as vLLM)"
            ) from None
        return ids[: len(ids) - generated]

    async def aclose(self) -> None:
        await self.client.close()


async def check_tokenizer(scorer: PromptScorer, tokenizer: Any, field: str) -> None:
    """ConfigError unless the server's tokenizer encodes :data:`PROBE_TEXT` to the ids ``tokenizer`` gives it."""
    served = await scorer.tokenize(PROBE_TEXT)
    local = list(tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"])
    if served != local:
        at = next((i for i, (a, b) in enumerate(zip(served, local)) if a != b), min(len(served), len(local)))
        raise ConfigError(
            f"{field}: the server's tokenizer differs from the trainer's on a probe text "
            f"({len(served)} vs {len(local)} tokens, first difference at token {at}); "
            "the teacher behind the server must use the student's tokenizer"
        )
