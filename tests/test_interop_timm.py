"""timm <-> vlm ViT conversion: numerical equality with timm's own forward, for each supported architecture."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from conftest import assert_fp32_close

timm = pytest.importorskip("timm")

from vlm.interop import ShapeMismatchError, UnsupportedModelError, from_timm, load_weights, to_timm  # noqa: E402
from vlm.interop.timm import vit_from_timm_state_dict  # noqa: E402
from vlm.models.vit import VisionTransformer  # noqa: E402


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Adds noise to every parameter so that zero biases, unit norms and constant LayerScales cannot hide a
    wrongly mapped tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_timm(img_size: int = 32, **kw) -> torch.nn.Module:
    kw.setdefault("depth", 2)
    kw.setdefault("patch_size", 8)
    return perturbed(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, **kw))


def timm_pooled(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.forward_head(m.forward_features(x), pre_logits=True)


def assert_like_timm(ours: torch.Tensor, m: torch.nn.Module, x: torch.Tensor, forward=timm_pooled, msg: str = ""):
    """``ours`` is as close to timm's float64 result (a float64 copy of ``m``, which also resamples its position
    embedding in float64) as timm's own float32 one: a bound that holds on every CPU."""
    with torch.no_grad():
        assert_fp32_close(ours, forward(m, x), forward(copy.deepcopy(m).double(), x.double()), msg=msg)


CONFIGS = {
    "token": {},
    "avg": dict(global_pool="avg"),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "avg_no_fc_norm": dict(global_pool="avg", fc_norm=False),
    "token_fc_norm": dict(fc_norm=True),
    "layer_scale": dict(init_values=0.1),
    "clip_style_pre_norm": dict(pre_norm=True, act_layer="quick_gelu"),
    "gelu_tanh_no_qkv_bias": dict(act_layer="gelu_tanh", qkv_bias=False),
    "mlp_ratio_eps": dict(mlp_ratio=2.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)),
    "patch16_with_head": dict(patch_size=16, img_size=64, num_classes=10),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_timm_matches_timm_forward(name):
    kw = dict(CONFIGS[name])
    m = make_timm(**kw)
    vit = from_timm(m)
    size = m.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_like_timm(vit.forward_tokens(x), m, x, lambda model, y: model.forward_features(y), msg="tokens")
        assert_like_timm(vit(x), m, x, msg="pooled")
        back = to_timm(vit).eval()
        assert_like_timm(timm_pooled(back, x), m, x, msg="back in timm")
    ref = {k: v for k, v in m.state_dict().items() if not k.startswith("head.")}
    assert set(back.state_dict()) == set(ref)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.items())


def test_config_read_from_timm():
    m = make_timm(global_pool="avg", class_token=False, init_values=1e-4, pre_norm=True, drop_path_rate=0.1)
    vit = from_timm(m)
    assert (vit.pool, vit.cls_token, vit.patch_embed.proj.bias) == ("avg", None, None)
    assert vit.blocks[0].ls1.gamma.shape == (192,) and vit.patch_size == 8 and vit.image_size == 32
    assert vit.blocks[-1].drop_path1.p == pytest.approx(0.1)


def test_different_image_size_than_checkpoint(tmp_path):
    """A 32 px checkpoint used at 48 px: resampled at conversion, or on the fly, equals timm's own resampling."""
    m = make_timm(img_size=32)
    path = tmp_path / "vit.pth"
    torch.save(m.state_dict(), path)
    # timm resamples the position embedding while loading a checkpoint into a model of another size
    m48 = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, img_size=48, depth=2,
        patch_size=8,
    ).eval()
    x = torch.randn(2, 3, 48, 48)
    # float64: timm resampling the float64 weights to 48 px (set_input_size, the resampling loading does)
    exact_model = copy.deepcopy(m).double()
    exact_model.set_input_size(img_size=(48, 48))
    with torch.no_grad():
        ref, exact = timm_pooled(m48, x), timm_pooled(exact_model, x.double())
        assert_fp32_close(from_timm(m, image_size=48)(x), ref, exact, msg="resampled at conversion")
        assert_fp32_close(from_timm(m)(x), ref, exact, msg="on the fly")  # vlm's ViT resamples for any input size
        assert_fp32_close(vit_from_timm_state_dict(path, image_size=48)(x), ref, exact, msg="from the file")
        m.set_input_size(img_size=(48, 48))
        assert_fp32_close(timm_pooled(m, x), ref, exact, msg="timm's set_input_size")
    vit48 = from_timm(m48)
    assert vit48.image_size == 48 and vit48.pos_embed.shape == (1, 1 + 36, 192)


def test_dynamic_img_size_timm_model():
    m = make_timm(dynamic_img_size=True)
    vit = from_timm(m)
    x = torch.randn(1, 3, 40, 56)  # non-square, not the training size
    with torch.no_grad():
        assert_like_timm(vit(x), m, x)


def test_to_timm_from_a_vlm_vit():
    torch.manual_seed(0)
    for kw in (dict(pre_norm=True, patch_bias=True), dict(pre_norm=False, patch_bias=False, pool="avg")):
        vit = perturbed(VisionTransformer(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, **kw))
        m = to_timm(vit).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert_like_timm(vit(x), m, x)
        assert (m.patch_embed.proj.bias is not None) == kw["patch_bias"]
    dyn = to_timm(vit, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert_like_timm(vit(x), dyn, x, msg="dynamic size")


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(reg_tokens=4, global_pool="avg"), "register tokens"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(no_embed_class=True), "no_embed_class"),
        (dict(dynamic_img_pad=True), "dynamic image padding"),
        (dict(global_pool="map"), "global_pool='map'"),
        (dict(final_norm=False), "final_norm"),
        (dict(proj_bias=False), "proj_bias"),
    ],
)
def test_unsupported_timm_features_are_named(kw, words):
    with pytest.raises(UnsupportedModelError, match="cannot convert") as err:
        from_timm(make_timm(**kw))
    assert words in str(err.value)


def test_unsupported_block_and_mlp_types():
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import ResPostBlock

    with pytest.raises(UnsupportedModelError, match="block type ResPostBlock"):
        from_timm(make_timm(block_fn=ResPostBlock))
    with pytest.raises(UnsupportedModelError, match="MLP type GluMlp"):
        from_timm(make_timm(mlp_layer=SwiGLUPacked, act_layer="silu"))


def test_state_dict_helpers_and_errors(tmp_path):
    m = make_timm(global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    # a timm state dict loads straight into a vlm ViT of the same architecture (the names are timm's)
    vit = VisionTransformer(image_size=32, patch_size=8, width=192, depth=2, num_heads=3, pool="avg").eval()
    load_weights(vit, m.state_dict())
    with torch.no_grad():
        assert_like_timm(vit(x), m, x)
    # ... and a checkpoint of another width names the first mismatched key and both shapes
    small = VisionTransformer(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, pool="avg")
    with pytest.raises(ShapeMismatchError, match=r"first mismatched key 'cls_token'.*\(1, 1, 192\).*\(1, 1, 64\)"):
        load_weights(small, m.state_dict())
    sd = dict(m.state_dict(), reg_token=torch.zeros(1, 4, 192))
    with pytest.raises(UnsupportedModelError, match="register tokens"):
        vit_from_timm_state_dict(sd)
    with pytest.raises(UnsupportedModelError, match="supported families"):
        load_weights(vit, {"encoder.layer.0.weight": torch.zeros(2)})
