"""The chunked token log-probabilities equal the log-softmax of full logits, in fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from distill.losses.logprobs import chunked_token_logprobs


@pytest.mark.parametrize("chunk_size", [1, 5, 128])
def test_chunked_token_logprobs_equal_the_full_log_softmax(chunk_size):
    torch.manual_seed(0)
    hidden, head = torch.randn(13, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (13,))
    full = torch.log_softmax(hidden @ head.T, -1)[torch.arange(13), targets]
    torch.testing.assert_close(chunked_token_logprobs(hidden, head, targets, chunk_size), full)


def test_chunked_token_logprobs_under_autocast_project_in_bf16():
    torch.manual_seed(0)
    hidden, head = torch.randn(9, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_token_logprobs(hidden, head, targets, 4)
        logits = (hidden @ head.T).float()  # the model's own head under autocast: a bf16 product
    torch.testing.assert_close(chunked, torch.log_softmax(logits, -1)[torch.arange(9), targets])
    assert chunked.dtype == torch.float32
    assert chunked_token_logprobs(hidden[:0], head, targets[:0]).shape == (0,)
