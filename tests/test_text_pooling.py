"""TextTransformer pooling: ``mean`` (what the default CLIP config uses) and ``eot``, against their definitions."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_fp32_close

from vlm.models.text import TextTransformer

EOT, PAD = 99, 0


def tower(pool: str) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(vocab_size=100, context_length=12, width=32, depth=2, num_heads=2, eot_token_id=EOT,
                           pool=pool).eval()


def batch() -> torch.Tensor:
    rows = [[5, 6, 7, EOT], [8, 9, 10, 11, 12, 13, EOT], [14, EOT]]
    ids = torch.full((3, 12), PAD)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids


@torch.no_grad()
def test_mean_pooling_is_the_mean_of_the_states_up_to_and_including_eot():
    model, ids = tower("mean"), batch()
    states = model.forward_tokens(ids)  # (b, n, d)
    exact = copy.deepcopy(model).double().forward_tokens(ids)  # the pooled run sums 7 positions, not 12
    for i, length in enumerate([4, 7, 2]):
        assert_fp32_close(model(ids)[i], states[i, :length].mean(0), exact[i, :length].mean(0))


@torch.no_grad()
@pytest.mark.parametrize("pool", ["mean", "eot"])
def test_padding_after_eot_does_not_change_the_embedding(pool):
    model, ids = tower(pool), batch()
    other = ids.clone()
    other[other == PAD] = 42  # anything after end-of-text: causal attention never lets it back in
    exact = copy.deepcopy(model).double()(ids)  # other tokens in the padding may change only the float32 rounding
    assert_fp32_close(model(other), model(ids), exact, msg="other padding")
    assert_fp32_close(model(ids[:, :7]), model(ids), exact, msg="cut")  # cut off after the longest row


@torch.no_grad()
def test_eot_pooling_is_the_state_at_eot_and_differs_from_the_mean():
    eot, mean, ids = tower("eot"), tower("mean"), batch()
    states = eot.forward_tokens(ids)
    exact = copy.deepcopy(eot).double().forward_tokens(ids)  # the pooled run computes 7 positions, not 12
    at_eot = (torch.arange(3), torch.tensor([3, 6, 1]))
    assert_fp32_close(eot(ids), states[at_eot], exact[at_eot])
    assert not torch.allclose(eot(ids), mean(ids), atol=1e-3)  # same weights (same seed), other pooling
    with pytest.raises(ValueError, match="pool must be 'eot' or 'mean'"):
        TextTransformer(width=32, depth=1, num_heads=2, pool="max")
