"""Attention weights on request: record_attention and the explicit softmax path it switches on."""

import copy

import pytest
import torch
from conftest import assert_fp32_close

from vlm.models.layers import Attention, KVCache, attention_weights, record_attention
from vlm.models.vit import VisionTransformer


def _values(attn: Attention, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """The module's value heads for ``x`` (self-attention) or ``context`` (cross-attention), (b, h, m, d)."""
    if attn.is_cross:
        return attn.project_context(context)[1]
    b, n, _ = x.shape
    return attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]


def _apply(attn: Attention, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = weights.shape
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "cross"])
def test_recorded_weights_reproduce_the_fused_output(case):
    torch.manual_seed(0)
    cross = case == "cross"
    attn = Attention(32, 4, context_dim=24 if cross else None).eval()
    x = torch.randn(2, 7, 32)
    context = torch.randn(2, 5, 24) if cross else None
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = (torch.rand(2, 1, 7, 7) > 0.3) | torch.eye(7, dtype=torch.bool)
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 7, 7)
    with torch.no_grad():
        fused = attn(x, context=context, **kwargs)
        with record_attention(attn) as maps:
            recorded_out = attn(x, context=context, **kwargs)
        weights = maps[""][0]
        rebuilt = _apply(attn, weights, _values(attn, x, context))
        as64 = {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items() if torch.is_tensor(v)}
        exact = copy.deepcopy(attn).double()(x.double(), context=None if context is None else context.double(),
                                             **{**kwargs, **as64})
    m = 5 if cross else 7
    assert weights.shape == (2, 4, 7, m)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
    # Another order of the same sums than the fused kernel's: as close to the float64 output as the fused one is.
    assert_fp32_close(rebuilt, fused, exact, msg="rebuilt")
    assert_fp32_close(recorded_out, fused, exact, msg="recorded")
    if case == "causal":
        assert weights.triu(1).abs().max() == 0  # no query sees a later key
    if case == "bool_mask":
        assert weights.masked_select(~kwargs["attn_mask"].expand(2, 4, 7, 7)).abs().max() == 0


def test_recording_with_a_kv_cache_records_one_row_per_step():
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x = torch.randn(1, 5, 16)
    cache = KVCache(1)
    with torch.no_grad(), record_attention(attn) as maps:
        attn(x[:, :3], is_causal=True, cache=cache)
        attn(x[:, 3:4], is_causal=True, cache=cache)
        attn(x[:, 4:5], is_causal=True, cache=cache)
        full = attention_weights(*_qk(attn, x), is_causal=True)
    shapes = [tuple(w.shape) for w in maps[""]]
    assert shapes == [(1, 2, 3, 3), (1, 2, 1, 4), (1, 2, 1, 5)]
    torch.testing.assert_close(maps[""][2][0, :, 0], full[0, :, 4])  # the last step's row of the full map


def _qk(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, _ = x.shape
    q, k, _ = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return q, k


def test_record_attention_names_every_layer_and_switches_off_after():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=32, depth=3, num_heads=4).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = vit(images)
        with record_attention(vit) as maps:
            during = vit(images)
        after = vit(images)
        exact = copy.deepcopy(vit).double()(images.double())
    assert sorted(maps) == [f"blocks.{i}.attn" for i in range(3)]
    assert all(len(v) == 1 and v[0].shape == (2, 4, 17, 17) for v in maps.values())
    assert_fp32_close(during, before, exact)  # the explicit softmax path sums in another order than the fused one
    assert torch.equal(after, before)  # the fused path again, bit for bit
    assert all(block.attn.recorded is None for block in vit.blocks)


def test_recording_is_released_after_an_error_and_refuses_nesting():
    vit = VisionTransformer(image_size=16, patch_size=8, width=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="boom"), record_attention(vit):
        raise ValueError("boom")
    assert vit.blocks[0].attn.recorded is None
    with record_attention(vit), pytest.raises(RuntimeError, match="already being recorded"):
        with record_attention(vit):
            pass
    assert vit.blocks[0].attn.recorded is None


def test_gradients_flow_through_the_recorded_path():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(2, 4, 16, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    copy.deepcopy(attn).double()(x64).sum().backward()
    attn(x).sum().backward()
    fused_grad = x.grad.clone()
    x.grad = None
    with record_attention(attn):
        attn(x).sum().backward()
    assert_fp32_close(x.grad, fused_grad, x64.grad)
