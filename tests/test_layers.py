"""The single attention module against torch.nn.MultiheadAttention, and the KV cache against full recompute."""

from __future__ import annotations

import copy

import torch
from conftest import assert_fp32_close
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
    exact, _ = copy.deepcopy(mha).double()(*[x.double()] * 3, need_weights=False)
    assert_fp32_close(attn(x), ref, exact)  # as close to MHA's float64 result as MHA's own float32 one


def test_causal_and_padding_masks_match_multihead_attention():
    attn = Attention(32, 4).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    _copy_to_mha(attn, mha)
    x = torch.randn(2, 6, 32)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # MHA: True = masked out
    mha64, x64 = copy.deepcopy(mha).double(), x.double()
    ref, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    exact, _ = mha64(x64, x64, x64, attn_mask=causal, need_weights=False)
    assert_fp32_close(attn(x, is_causal=True), ref, exact, msg="causal")
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])  # second row: last two keys are padding
    ref, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    exact, _ = mha64(x64, x64, x64, key_padding_mask=pad, need_weights=False)
    ours = attn(x, attn_mask=(~pad)[:, None, None, :])  # ours: True = may attend
    assert_fp32_close(ours, ref, exact, msg="padding")


def test_cross_attention_matches_multihead_attention():
    attn = Attention(32, 4, context_dim=24).eval()
    mha = nn.MultiheadAttention(32, 4, kdim=24, vdim=24, batch_first=True).eval()
    _copy_to_mha(attn, mha)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    ref, _ = mha(x, ctx, ctx, need_weights=False)
    exact, _ = copy.deepcopy(mha).double()(x.double(), ctx.double(), ctx.double(), need_weights=False)
    assert_fp32_close(attn(x, context=ctx), ref, exact)


def test_kv_cache_incremental_equals_full_causal():
    blocks = nn.ModuleList(Block(32, 4) for _ in range(2)).eval()
    x = torch.randn(2, 10, 32)
    full, exact = x, x.double()
    for blk in blocks:
        full, exact = blk(full, is_causal=True), copy.deepcopy(blk).double()(exact, is_causal=True)
    cache = KVCache(len(blocks))
    steps = []
    for chunk in (x[:, :4], x[:, 4:5], x[:, 5:9], x[:, 9:]):  # a prompt, then single tokens and a chunk
        h = chunk
        for i, blk in enumerate(blocks):
            h = blk(h, is_causal=True, cache=cache, layer_idx=i)
        steps.append(h)
    assert_fp32_close(torch.cat(steps, dim=1), full, exact)  # other product shapes: other float32 sums
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


def test_block_is_the_textbook_pre_norm_form_out_of_place():
    """``x + ls(attn(norm1(x)))`` then ``x + ls(mlp(norm2(x)))``, with or without autograd; nothing written in place
    (CPU buffer reuse is vlm.kernels' business, applied from outside)."""
    torch.manual_seed(0)
    blk = Block(32, 4, layer_scale=0.5)
    x = torch.randn(2, 7, 32)
    h = x + blk.ls1(blk.attn(blk.norm1(x), is_causal=True))
    reference = h + blk.ls2(blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(blk.norm2(h)))))
    assert torch.equal(blk(x, is_causal=True), reference)
    branches = []
    blk.ls2.register_forward_hook(lambda m, i, o: branches.append((o, o.clone())))
    with torch.no_grad():
        out = blk(x, is_causal=True)
    assert torch.equal(out, reference)
    branch, as_computed = branches[-1]
    assert torch.equal(branch, as_computed) and out.data_ptr() != branch.data_ptr()  # the branch was left alone


def test_models_are_plain_modules():
    """Every projection is a plain nn.Linear, and no model file reads the environment or the CPU or picks kernels."""
    from pathlib import Path

    from vlm.models.decoder import DecoderLM
    from vlm.models.flamingo import Flamingo
    from vlm.models.vit import VisionTransformer

    vision = VisionTransformer(image_size=16, patch_size=8, width=16, depth=1, num_heads=2)
    decoder = DecoderLM(vocab_size=40, context_length=16, width=32, depth=1, num_heads=2)
    model = Flamingo(vision, decoder, cross_attn_heads=2, num_latents=4, resampler_depth=1, resampler_heads=2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # 4 in the tower's block, 5 in the resampler, 4 in the decoder's block, 5 in the gated block
    assert len(linears) == 18 and all(type(m) is nn.Linear for m in linears)
    assert {type(m).__module__.split(".")[0] for m in model.modules()} <= {"vlm", "torch", "timm"}
    root = Path(__file__).resolve().parents[1] / "vlm" / "models"
    for path in root.glob("*.py"):
        source = path.read_text()
        for word in ("os.environ", "getenv", "/proc/", "mkldnn", "vlm.kernels import", "gelu_(", "relu_("):
            assert word not in source, f"{path.name} uses {word}"
