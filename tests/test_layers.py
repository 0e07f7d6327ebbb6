"""The single attention module against torch.nn.MultiheadAttention, and the KV cache against full recompute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm.models.layers import Attention, Block, DropPath, KVCache


def _copy_to_mha(attn: Attention, mha: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        if attn.is_cross:
            mha.in_proj_weight = None
            mha.q_proj_weight.copy_(attn.q.weight)
            k_w, v_w = attn.kv.weight.chunk(2, dim=0)
            mha.k_proj_weight.copy_(k_w)
            mha.v_proj_weight.copy_(v_w)
            mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        else:
            mha.in_proj_weight.copy_(attn.qkv.weight)
            mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)


def test_self_attention_matches_multihead_attention():
    attn = Attention(32, 4).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    _copy_to_mha(attn, mha)
    x = torch.randn(3, 7, 32)
    ref, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=0)


def test_causal_and_padding_masks_match_multihead_attention():
    attn = Attention(32, 4).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    _copy_to_mha(attn, mha)
    x = torch.randn(2, 6, 32)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # MHA: True = masked out
    ref, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(attn(x, is_causal=True), ref, atol=1e-5, rtol=0)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])  # second row: last two keys are padding
    ref, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    ours = attn(x, attn_mask=(~pad)[:, None, None, :])  # ours: True = may attend
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_cross_attention_matches_multihead_attention():
    attn = Attention(32, 4, context_dim=24).eval()
    mha = nn.MultiheadAttention(32, 4, kdim=24, vdim=24, batch_first=True).eval()
    _copy_to_mha(attn, mha)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    ref, _ = mha(x, ctx, ctx, need_weights=False)
    torch.testing.assert_close(attn(x, context=ctx), ref, atol=1e-5, rtol=0)


def test_kv_cache_incremental_equals_full_causal():
    blocks = nn.ModuleList(Block(32, 4) for _ in range(2)).eval()
    x = torch.randn(2, 10, 32)
    full = x
    for blk in blocks:
        full = blk(full, is_causal=True)
    cache = KVCache(len(blocks))
    steps = []
    for chunk in (x[:, :4], x[:, 4:5], x[:, 5:9], x[:, 9:]):  # a prompt, then single tokens and a chunk
        h = chunk
        for i, blk in enumerate(blocks):
            h = blk(h, is_causal=True, cache=cache, layer_idx=i)
        steps.append(h)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 10


def test_kv_cache_reorder_selects_rows():
    cache = KVCache(1)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).view(2, 1, 3, 2)
    cache.update(0, k, k + 100)
    cache.reorder(torch.tensor([1, 1]))
    keys, values = cache.update(0, torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))
    assert torch.equal(keys[0, :, :3], k[1]) and torch.equal(keys[1, :, :3], k[1])
    assert torch.equal(values[0, :, :3], k[1] + 100)


def test_drop_path_is_identity_in_eval_and_unbiased_in_training():
    dp = DropPath(0.5)
    x = torch.ones(4000, 8)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert abs(y.mean().item() - 1.0) < 0.1


# ------------------------------------------------------------------ fp32 CPU linear layers on oneDNN
@pytest.fixture
def onednn_at_any_size(monkeypatch):
    """These layers are far below the size from which oneDNN is used: lower it, so that the oneDNN path runs."""
    from vlm.models import layers

    monkeypatch.setattr(layers, "_ONEDNN_MIN_MACS", 0)


@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_blas_values_and_gradients(shape, bias, onednn_at_any_size):
    from vlm.models.layers import Linear, cpu_linear

    torch.manual_seed(0)
    layer = Linear(16, 24, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    runs = {}
    for backend in ("onednn", "blas"):
        with cpu_linear(backend):
            out = layer(x)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, 24)).sum(), [x, *layer.parameters()])
        runs[backend] = out, grads
    (out, grads), (ref, ref_grads) = runs["onednn"], runs["blas"]
    assert out.shape == (*shape[:-1], 24)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_onednn_linear_frozen_weights_and_in_place_residual(onednn_at_any_size):
    """A frozen layer still passes gradients to its input, and its output may take an in-place residual add."""
    from vlm.models.layers import Linear, cpu_linear

    layer = Linear(8, 8).requires_grad_(False)
    x = torch.randn(3, 4, 8, requires_grad=True)
    with cpu_linear("onednn"):
        out = layer(x).add_(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, layer.weight.sum(0).expand(3, 4, 8) + 1)
    assert layer.weight.grad is None


def test_onednn_mlp_fused_gelu_matches_the_blas_path(onednn_at_any_size):
    from vlm.models.layers import MLP, cpu_linear

    mlp = MLP(16, 64, act="gelu")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        with cpu_linear("onednn"):
            fused = mlp(x)
        with cpu_linear("blas"):
            ref = mlp(x)
    torch.testing.assert_close(fused, ref)


def test_cpu_linear_names_a_bad_backend_and_autocast_falls_back_to_blas(onednn_at_any_size):
    from vlm.models.layers import Linear, cpu_linear

    with pytest.raises(ValueError, match="'onednn' or 'blas'"):
        with cpu_linear("mkl"):
            pass
    layer = Linear(8, 4)
    with cpu_linear("onednn"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16  # autocast still casts: F.linear ran


def test_default_cpu_linear_is_onednn_exactly_where_mkl_runs_its_generic_path(monkeypatch):
    from vlm.models import layers

    for generic, expected in ((True, "onednn"), (False, "blas")):
        monkeypatch.setattr(layers, "_mkl_runs_its_generic_path", lambda generic=generic: generic)
        assert layers._default_cpu_linear(None) == expected
        assert layers._default_cpu_linear("auto") == expected
        assert layers._default_cpu_linear("BLAS") == "blas"  # an explicit choice wins either way
        assert layers._default_cpu_linear("onednn") == "onednn"
    with pytest.warns(UserWarning, match=r"VLM_CPU_LINEAR must be .*got 'mkl'"):
        assert layers._default_cpu_linear("mkl") == "blas"  # named, then the automatic choice


def test_mkl_generic_path_is_read_off_the_cpu_vendor(monkeypatch, tmp_path):
    from vlm.models import layers

    real_open = open

    def cpuinfo(vendor):
        path = tmp_path / vendor
        path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\n\nprocessor\t: 1\nvendor_id\t: {vendor}\n")
        return lambda name, *a, **k: real_open(path if name == "/proc/cpuinfo" else name, *a, **k)

    monkeypatch.setattr(layers.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr("builtins.open", cpuinfo("AuthenticAMD"))
    assert layers._mkl_runs_its_generic_path()
    monkeypatch.setattr("builtins.open", cpuinfo("GenuineIntel"))
    assert not layers._mkl_runs_its_generic_path()
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # another BLAS: PyTorch's choice stands
    monkeypatch.setattr("builtins.open", cpuinfo("AuthenticAMD"))
    assert not layers._mkl_runs_its_generic_path()


def test_clip_projections_and_the_tied_lm_head_take_the_chosen_backend(monkeypatch, onednn_at_any_size):
    """The CLIP projections and the decoder's unembedding are vlm linears too: on oneDNN when it is chosen, with the
    same values as on BLAS."""
    from vlm.models import layers
    from vlm.models.decoder import DecoderLM

    calls = []
    real_mm = layers._onednn_mm
    monkeypatch.setattr(layers, "_onednn_mm", lambda x, w, *a: calls.append(tuple(w.shape)) or real_mm(x, w, *a))
    torch.manual_seed(0)
    lm = DecoderLM(vocab_size=50, context_length=8, width=16, depth=1, num_heads=2).eval()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        with layers.cpu_linear("onednn"):
            fast = lm(ids)
        assert (50, 16) in calls  # the tied unembedding
        assert len(calls) == 5  # and qkv, proj, fc1 (GELU fused), fc2
        with layers.cpu_linear("blas"):
            ref = lm(ids)
    torch.testing.assert_close(fast, ref)
    assert len(calls) == 5  # nothing on oneDNN under BLAS

    from vlm.models.clip import CLIP
    from vlm.models.text import TextTransformer
    from vlm.models.vit import VisionTransformer

    clip = CLIP(VisionTransformer(16, 8, width=16, depth=1, num_heads=2),
                TextTransformer(context_length=8, width=16, depth=1, num_heads=2), embed_dim=12)  # fmt: skip
    assert isinstance(clip.visual_proj, layers.Linear) and isinstance(clip.text_proj, layers.Linear)


def test_small_products_stay_on_blas():
    """oneDNN's per-call cost only pays off from about a million multiply-adds: smaller products keep BLAS."""
    from vlm.models import layers

    with layers.cpu_linear("onednn"):
        assert not layers._use_onednn(torch.zeros(2, 17, 64), torch.zeros(192, 64))  # 0.4M: a tiny test ViT's qkv
        assert layers._use_onednn(torch.zeros(128, 128), torch.zeros(384, 128))  # 6.3M
        assert layers._use_onednn(torch.zeros(4, 768), torch.zeros(768, 768))  # 2.4M: batched decoding steps
        assert not layers._use_onednn(torch.zeros(0, 768), torch.zeros(768, 768))
    with layers.cpu_linear("blas"):
        assert not layers._use_onednn(torch.zeros(128, 128), torch.zeros(384, 128))
