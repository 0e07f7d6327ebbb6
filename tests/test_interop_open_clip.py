"""open_clip <-> vlm CLIP conversion on random-weight models: equal embeddings, identical zero-shot predictions,
checkpoint files in and out."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_fp32_close

open_clip = pytest.importorskip("open_clip")

from vlm.data.tokenizer import CLIPTokenizer  # noqa: E402
from vlm.interop import (  # noqa: E402
    ShapeMismatchError,
    UnsupportedModelError,
    from_open_clip,
    load_open_clip_state_dict,
    load_weights,
    save_open_clip,
    to_open_clip,
)
from vlm.interop.open_clip import open_clip_cfg  # noqa: E402
from vlm.models.clip import CLIP  # noqa: E402
from vlm.models.text import TextTransformer  # noqa: E402
from vlm.models.vit import VisionTransformer  # noqa: E402
from vlm.zero_shot import build_classifier  # noqa: E402

CONTEXT = 16
CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}"]
TOKENIZER = CLIPTokenizer(CONTEXT)


def tiny_cfg(**changes) -> dict:
    """A tiny open_clip ViT CLIP config (the CLIP BPE vocabulary, so real token ids work)."""
    cfg = dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
        text_cfg=dict(context_length=CONTEXT, vocab_size=49408, width=48, heads=4, layers=2),
    )
    for key, value in changes.items():
        if key in ("vision_cfg", "text_cfg"):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_open_clip(custom_text: bool = False, **changes) -> torch.nn.Module:
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return perturbed(cls(**tiny_cfg(**changes)))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return TOKENIZER(["a red circle", "a small blue square left of a large green triangle", "x"])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def assert_same_embeddings(reference, ours, images, tokens) -> None:
    """Ours as close to open_clip's float64 embeddings as open_clip's own float32 ones (a CPU-independent bound)."""
    exact = copy.deepcopy(reference).double()
    with torch.no_grad():
        assert_fp32_close(ours.encode_image(images, normalize=False), reference.encode_image(images),
                          exact.encode_image(images.double()), msg="image embeddings")
        assert_fp32_close(ours.encode_text(tokens, normalize=False), reference.encode_text(tokens),
                          exact.encode_text(tokens), msg="text embeddings")


def zero_shot_logits(model, images, reference: bool) -> torch.Tensor:
    tokenizer = TOKENIZER
    with torch.no_grad():
        if reference:  # open_clip's own classifier builder
            classifier = open_clip.build_zero_shot_classifier(
                model, tokenizer, CLASSES, TEMPLATES, device="cpu", use_tqdm=False
            ).T
        else:
            classifier = build_classifier(model, tokenizer, CLASSES, TEMPLATES)
        return model.encode_image(images, normalize=True) @ classifier.T


def assert_same_zero_shot(ours, reference, images, decisive: bool = True) -> None:
    """The class scores are as close to open_clip's float64 ones as open_clip's own float32 scores, and the predicted
    class agrees for every image whose float64 best score leads the runner-up by more than twice either float32
    result's error (a near-tie may fall either way in either library). ``decisive``: every image must have such a
    lead, so that the predictions are really compared."""
    got, want = zero_shot_logits(ours, images, False), zero_shot_logits(reference, images, True)
    exact = zero_shot_logits(copy.deepcopy(reference).double(), images.double(), True)
    assert_fp32_close(got, want, exact, msg="zero-shot scores")
    error = max((got.double() - exact).abs().max().item(), (want.double() - exact).abs().max().item())
    top2 = exact.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * error
    assert clear.all() or not decisive, "near-tied scores: these weights do not test the predicted class"
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


VARIANTS = {
    "gelu": {},
    "quick_gelu": dict(quick_gelu=True),
    "layer_scale": dict(vision_cfg=dict(ls_init_value=0.1), text_cfg=dict(ls_init_value=0.1)),
    "no_ln_pre_avg_pool": dict(vision_cfg=dict(no_ln_pre=True, pool_type="avg")),
    "final_ln_after_pool": dict(vision_cfg=dict(final_ln_after_pool=True)),
    "eps_mlp_ratio": dict(vision_cfg=dict(mlp_ratio=2.0, norm_kwargs={"eps": 1e-6}), text_cfg=dict(mlp_ratio=3.0)),
    "siglip_bias_eos_pool": dict(init_logit_bias=-10.0, text_cfg=dict(pool_type="eos", eos_id=49407)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_from_open_clip_equal_embeddings_and_zero_shot(name, images, tokens):
    reference = make_open_clip(**copy.deepcopy(VARIANTS[name]))
    ours = from_open_clip(reference)
    assert not ours.training
    assert_same_embeddings(reference, ours, images, tokens)
    assert_same_zero_shot(ours, reference, images)
    assert torch.equal(ours.logit_scale, reference.logit_scale)
    # and back: the open_clip model rebuilt from vlm's has the very same state dict
    back = to_open_clip(ours).eval()
    ref_sd = reference.state_dict()
    assert set(back.state_dict()) == set(ref_sd)
    assert all(torch.equal(v, ref_sd[k]) for k, v in back.state_dict().items())
    assert_same_embeddings(back, ours, images, tokens)


def test_custom_text_clip(images, tokens):
    reference = make_open_clip(custom_text=True, quick_gelu=True)
    ours = from_open_clip(reference)
    assert_same_embeddings(reference, ours, images, tokens)


@pytest.mark.parametrize("eot", [49407, 49406])  # 49406 (start of text, in every row): open_clip "eos" pooling
def test_to_open_clip_from_a_vlm_clip(eot, images, tokens):
    torch.manual_seed(0)
    vision = VisionTransformer(
        image_size=32, patch_size=8, width=64, depth=2, num_heads=4, pre_norm=True, patch_bias=False,
        norm_eps=1e-5, act="quick_gelu",
    )
    text = TextTransformer(context_length=CONTEXT, width=48, depth=2, num_heads=4, act="quick_gelu", eot_token_id=eot)
    ours = perturbed(CLIP(vision, text, embed_dim=24))
    reference = to_open_clip(ours).eval()
    assert reference.text_pool_type == ("argmax" if eot == 49407 else "eos")
    assert_same_embeddings(reference, ours, images, tokens)
    # Pooled at start-of-text, which leads every prompt, a causal tower gives all classes one embedding: the scores
    # tie, and only their equality is checked.
    assert_same_zero_shot(ours, reference, images, decisive=eot == 49407)


def test_export_loads_with_open_clip_create_model(tmp_path, images, tokens):
    ours = from_open_clip(make_open_clip(quick_gelu=True, text_cfg=dict(ls_init_value=0.5)))
    weights = save_open_clip(ours, tmp_path / "export", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    from_dir = open_clip.create_model("local-dir:" + str(tmp_path / "export")).eval()
    assert_same_embeddings(from_dir, ours, images, tokens)
    # by name: the user's config registered with open_clip, the weights file passed as `pretrained`
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "vlm-tiny-test.json").write_text(__import__("json").dumps(open_clip_cfg(ours)))
    open_clip.add_model_config(tmp_path / "configs")
    by_name = open_clip.create_model("vlm-tiny-test", pretrained=str(weights)).eval()
    assert_same_embeddings(by_name, ours, images, tokens)
    assert_same_zero_shot(ours, by_name, images)


def test_load_open_clip_checkpoint_files(tmp_path, images, tokens):
    """QuickGELU weights with a non-default context length in open_clip's training-checkpoint layout; the
    architecture read off the shapes (open_clip's 64-wide heads) or given as an open_clip model_cfg."""
    cfg = tiny_cfg(quick_gelu=True, vision_cfg=dict(width=128, head_width=64), text_cfg=dict(width=128, heads=2))
    reference = perturbed(open_clip.CLIP(**cfg))
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
               tmp_path / "epoch_3.pt")  # open_clip's training checkpoint layout (DDP prefix)
    ours = load_open_clip_state_dict(tmp_path / "epoch_3.pt", quick_gelu=True)
    assert ours.text.context_length == CONTEXT and not ours.training
    assert_same_embeddings(reference, ours, images, tokens)
    ours = load_open_clip_state_dict(reference.state_dict(), model_cfg=cfg)
    assert_same_embeddings(reference, ours, images, tokens)
    # load_weights into an existing vlm CLIP of the same architecture
    target = from_open_clip(perturbed(open_clip.CLIP(**cfg), seed=5))
    load_weights(target, tmp_path / "epoch_3.pt")
    assert_same_embeddings(reference, target.eval(), images, tokens)


def test_load_at_another_image_size_matches_open_clip(tmp_path, tokens):
    reference = make_open_clip()
    path = tmp_path / "w.pt"
    torch.save(reference.state_dict(), path)
    ours = load_open_clip_state_dict(path, model_cfg=tiny_cfg(), image_size=48)
    assert ours.vision.image_size == 48
    # open_clip resizes the position embedding itself when loading into a larger model
    big_cfg = tiny_cfg(vision_cfg=dict(image_size=48))
    big = open_clip.CLIP(**big_cfg).eval()
    open_clip.load_checkpoint(big, str(path))
    x = torch.randn(2, 3, 48, 48)
    assert_same_embeddings(big, ours, x, tokens)


def test_checkpoint_that_does_not_fit_names_key_and_shapes():
    reference = make_open_clip()
    wider = tiny_cfg(vision_cfg=dict(width=96, head_width=16))
    match = r"first mismatched key 'vision\.cls_token'.*\(1, 1, 64\).*\(1, 1, 96\)"
    with pytest.raises(ShapeMismatchError, match=match):
        load_open_clip_state_dict(reference.state_dict(), model_cfg=wider)


def test_unsupported_families_and_features():
    with pytest.raises(UnsupportedModelError, match="supported families: open_clip ViT CLIP"):
        load_open_clip_state_dict({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)})
    with pytest.raises(UnsupportedModelError, match="attentional pooling"):
        from_open_clip(make_open_clip(vision_cfg=dict(attentional_pool=True, attn_pooler_heads=4)))
    with pytest.raises(UnsupportedModelError, match="qk_norm"):
        from_open_clip(make_open_clip(vision_cfg=dict(qk_norm=True)))
    with pytest.raises(UnsupportedModelError, match="bidirectional text tower"):
        load_open_clip_state_dict(make_open_clip().state_dict(), model_cfg=tiny_cfg(text_cfg=dict(no_causal_mask=True)))
    vlm_clip = CLIP(VisionTransformer(image_size=32, patch_size=8, width=32, depth=1, num_heads=2),
                    TextTransformer(context_length=8, width=32, depth=1, num_heads=2), embed_dim=16)
    with pytest.raises(UnsupportedModelError, match="bias on the patch convolution"):
        to_open_clip(vlm_clip)
