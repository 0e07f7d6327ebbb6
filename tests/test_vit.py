"""VisionTransformer: parity with timm (copied weights), position-embedding resampling, patch dropout, checkpointing."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import assert_fp32_close

from vlm.models.text import TextTransformer
from vlm.models.vit import VisionTransformer


def test_matches_timm_with_copied_weights():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=4)
    ref = ref.eval()
    ours = VisionTransformer(image_size=32, patch_size=8, width=192, depth=4, num_heads=3).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref64 = copy.deepcopy(ref).double()  # each as close to timm's float64 result as timm's own float32 one
    assert_fp32_close(ours(x), ref(x), ref64(x.double()), msg="pooled")
    assert_fp32_close(ours.forward_tokens(x), ref.forward_features(x), ref64.forward_features(x.double()), msg="tokens")


def test_resampled_position_embedding_matches_timm_dynamic_size():
    kw = dict(pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2, dynamic_img_size=True)
    ref = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    ours = VisionTransformer(image_size=32, patch_size=8, width=192, depth=2, num_heads=3).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 48, 48)  # a 6x6 grid instead of the 4x4 the embedding was made for
    assert_fp32_close(ours(x), ref(x), copy.deepcopy(ref).double()(x.double()))


def test_avg_pool_without_class_token_matches_timm():
    kw = dict(pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2)
    ref = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **kw).eval()
    ours = VisionTransformer(32, 8, width=192, depth=2, num_heads=3, class_token=False, pool="avg").eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert_fp32_close(ours(x), ref(x), copy.deepcopy(ref).double()(x.double()))


def test_patch_dropout_only_in_training():
    vit = VisionTransformer(32, 8, width=32, depth=1, num_heads=2, patch_dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    assert vit.train().forward_tokens(x).shape == (2, 1 + 8, 32)  # 16 patches -> 8 kept, plus the class token
    assert vit.eval().forward_tokens(x).shape == (2, 1 + 16, 32)


@pytest.mark.parametrize("tower", ["vit", "text"])
def test_gradient_checkpointing_gives_same_outputs_and_gradients(tower):
    if tower == "vit":
        model, x = VisionTransformer(16, 4, width=32, depth=2, num_heads=2), torch.randn(2, 3, 16, 16)
    else:
        model, x = TextTransformer(vocab_size=50, context_length=8, width=32, depth=2, num_heads=2), torch.randint(
            0, 50, (2, 8)
        )
    out = model(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    out2 = model(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_bad_image_size_is_a_clear_error(stem):
    vit = VisionTransformer(16, 4, width=32, depth=1, num_heads=2, stem=stem)
    with pytest.raises(ValueError, match="image size 18x18 is not divisible by the patch size 4"):
        vit(torch.randn(1, 3, 18, 18))


def test_forward_tokens_are_normalised_and_intermediate_tokens_are_not():
    """Two methods, each with one kind of result: the final normalised tokens, or an earlier block's raw output."""
    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, width=32, depth=3, num_heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        last = vit.intermediate_tokens(x, skip_last_blocks=0)  # the last block's output, before the final norm
        torch.testing.assert_close(vit.forward_tokens(x), vit.norm(last))
        assert not torch.allclose(vit.forward_tokens(x), last)
        penultimate = vit.intermediate_tokens(x, skip_last_blocks=1)
        torch.testing.assert_close(vit.blocks[-1](penultimate), last)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=r"skip_last_blocks must be in \[0, 3\)"):
            vit.intermediate_tokens(x, bad)
    with pytest.raises(TypeError):
        vit.forward_tokens(x, skip_last_blocks=1)  # no flag that changes what comes back


def test_text_tower_pools_at_end_of_text_and_is_causal():
    text = TextTransformer(vocab_size=60, context_length=8, width=32, depth=2, num_heads=2, eot_token_id=59).eval()
    ids = torch.tensor([[58, 5, 6, 59, 0, 0, 0, 0], [58, 7, 59, 0, 0, 0, 0, 0]])
    tokens = text.forward_tokens(ids)
    torch.testing.assert_close(text(ids), torch.stack([tokens[0, 3], tokens[1, 2]]))
    changed = ids.clone()
    changed[:, 5:] = 9  # tokens after EOT cannot influence the pooled EOT state under the causal mask
    torch.testing.assert_close(text(changed), text(ids))


def test_conv_stem_is_local_per_sample_and_keeps_the_token_grid():
    vit = VisionTransformer(32, 8, width=32, depth=1, num_heads=2, stem="conv").eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = vit.patch_embed(x)
    assert tokens.shape == (3, 16, 32)  # the 4x4 grid of 8-pixel patches, like the patchify stem
    y = x.clone()
    y[:, :, :8, :8] += 1.0  # change the top-left patch only
    changed = (vit.patch_embed(y) - tokens).abs().amax(dim=(0, 2)) > 0
    # 3x3 stride-2 convolutions see a few pixels past a patch: its right/lower neighbours may change, no more
    assert changed[0] and not changed.view(4, 4)[2:, :].any() and not changed.view(4, 4)[:, 2:].any()
    # GroupNorm, not BatchNorm: a sample's features do not depend on the rest of the batch, even in training
    vit.train()
    torch.testing.assert_close(vit.patch_embed(x[:1]), vit.patch_embed(x)[:1])


def test_conv_stem_errors_and_no_timm_export():
    from vlm.interop import to_timm
    from vlm.interop.timm import UnsupportedModelError

    with pytest.raises(ValueError, match="power-of-two patch_size"):
        VisionTransformer(36, 6, width=32, depth=1, num_heads=2, stem="conv")
    with pytest.raises(ValueError, match="stem must be"):
        VisionTransformer(32, 8, width=32, depth=1, num_heads=2, stem="hybrid")
    with pytest.raises(UnsupportedModelError, match="'conv' stem"):
        to_timm(VisionTransformer(32, 8, width=32, depth=1, num_heads=2, stem="conv"))


def test_channel_norm_is_timms_layernorm2d():
    """The conv stem's norm is written in vlm (importing timm costs seconds at start-up): same parameters, same
    output as timm's LayerNorm2d, so conv-stem checkpoints and their outputs are what they were."""
    from timm.layers import LayerNorm2d

    from vlm.models.vit import ChannelNorm

    torch.manual_seed(0)
    ours, theirs = ChannelNorm(6), LayerNorm2d(6)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys() and ours.eps == theirs.eps
    x = torch.randn(2, 6, 5, 7)
    assert torch.equal(ours(x), theirs(x))
