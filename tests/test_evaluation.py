"""Agreement and teacher-forced NLL against cases computable by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from epikv_triton import evaluation


@pytest.mark.parametrize(
    "reference, candidate, fraction, first",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0, None),
        ([1, 2, 3, 4], [1, 2, 9, 4], 0.75, 2),
        ([1, 2, 3, 4], [9, 2, 3, 4], 0.75, 0),
        ([1, 2, 3, 4], [1, 2], 0.5, 2),  # a short candidate: missing positions differ
        ([5], [6], 0.0, 0),
    ],
)
def test_agreement(reference, candidate, fraction, first):
    result = evaluation.agreement(reference, candidate)
    assert result.fraction == fraction and result.first_divergence == first


def test_agreement_needs_a_reference():
    with pytest.raises(ValueError, match="empty"):
        evaluation.agreement([], [1])


class ScriptedModel(torch.nn.Module):
    """Logits chosen per input token, and a cache that counts what it was fed."""

    def __init__(self, logits_for_token):
        super().__init__()
        self.logits_for_token = logits_for_token
        self.calls = []

    def forward(self, input_ids, past_key_values, use_cache):
        self.calls.append(input_ids.shape[1])
        past_key_values.seen += input_ids.shape[1]
        logits = torch.stack([self.logits_for_token(int(t)) for t in input_ids[0]])[None]
        return SimpleNamespace(logits=logits)


class CountingCache:
    def __init__(self):
        self.seen = 0

    def stats(self):
        return SimpleNamespace(allocated_bytes=100 * self.seen)


def test_uniform_model_has_nll_log_vocab():
    vocab = 7
    model = ScriptedModel(lambda token: torch.zeros(vocab))
    context, continuation = torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5, 6]])
    result = evaluation.teacher_forced(model, context, continuation, CountingCache, chunk=3)
    assert result.nll == pytest.approx(math.log(vocab))
    assert model.calls == [3, 2]  # 5 tokens fed (the last target is never an input), in chunks of 3
    assert result.peak_kv_bytes == 500


def test_confident_model_nll_and_predictions():
    # Each token predicts token + 1 with probability 1/2, spreading the rest evenly over 3 others.
    vocab = 4

    def logits(token):
        probs = torch.full((vocab,), 1 / 6)
        probs[(token + 1) % vocab] = 1 / 2
        return probs.log()

    model = ScriptedModel(logits)
    context, continuation = torch.tensor([[0]]), torch.tensor([[1, 2, 0]])
    result = evaluation.teacher_forced(model, context, continuation, CountingCache, chunk=1)
    # Targets 1 and 2 get 1/2 each; target 0 after token 2 (which predicts 3) gets 1/6.
    assert result.nll == pytest.approx((2 * math.log(2) + math.log(6)) / 3)
    assert result.predictions == [1, 2, 3]


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk"):
        evaluation.teacher_forced(None, torch.tensor([[1]]), torch.tensor([[2]]), CountingCache, chunk=0)
