"""open_clip ViT-based CLIP models in and out of vlm: configs and models (the state-dict key map is in
:mod:`vlm.interop.open_clip_keys`).

open_clip's text tower pools at ``text.argmax(-1)``, the highest token id, which for the CLIP BPE vocabulary is the
end-of-text token (49407 = ``vocab_size - 1``); vlm pools at the first ``eot_token_id``, so the two agree on
every tokenizer output. Both towers use nn.GELU or QuickGELU (``-quickgelu`` configs, OpenAI's weights).
Checkpoint files (open_clip's in, open_clip-loadable out) are in :mod:`vlm.interop.open_clip_files`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm.interop.open_clip_keys import open_clip_to_vlm_state_dict, vlm_to_open_clip_state_dict
from vlm.interop.weights import (
    UnsupportedModelError,
    activation_name,
    is_identity,
    layer_norm_eps,
    load_checked,
)
from vlm.models.clip import CLIP
from vlm.models.layers import LayerScale
from vlm.models.text import TextTransformer
from vlm.models.vit import VisionTransformer


def _check_cfg(cfg: dict[str, Any]) -> None:
    """Raises :class:`UnsupportedModelError` naming every open_clip option vlm's CLIP cannot express."""
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    found = []
    if v.get("timm_model_name"):
        found.append(f"a timm image tower ({v['timm_model_name']}); convert it with vlm.interop.from_timm")
    if isinstance(v.get("layers", 12), (list, tuple)):
        found.append("a ResNet image tower")
    if v.get("attentional_pool"):
        found.append("attentional pooling")
    if v.get("pool_type", "tok") not in ("tok", "avg"):
        found.append(f"image pool_type={v['pool_type']!r}")
    if v.get("pos_embed_type", "learnable") != "learnable":
        found.append(f"pos_embed_type={v['pos_embed_type']!r}")
    if t.get("hf_model_name"):
        found.append(f"a Hugging Face text tower ({t['hf_model_name']}); vlm's HFTextEncoder wraps those")
    for name, c in (("image", v), ("text", t)):
        custom = [k for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                              "scale_fc") if c.get(k)]
        if custom or c.get("block_type", "default") not in (None, "default"):
            found.append(f"custom {name} attention blocks ({', '.join(custom) or c.get('block_type')})")
    if t.get("embed_cls"):
        found.append("a text class token (embed_cls)")
    if t.get("no_causal_mask"):
        found.append("a bidirectional text tower (no_causal_mask)")
    if t.get("pool_type", "argmax") not in ("argmax", "eos"):
        found.append(f"text pool_type={t['pool_type']!r} (vlm pools at the end-of-text token)")
    if t.get("final_ln_after_pool"):
        found.append("text final_ln_after_pool")
    if t.get("proj_bias") or t.get("proj_type", "linear") != "linear":
        found.append("a text projection other than a bias-free linear map")
    if "multimodal_cfg" in cfg:
        found.append("a CoCa multimodal decoder")
    if found:
        raise UnsupportedModelError("vlm's CLIP cannot express this open_clip model: " + "; ".join(found))


def _act_name(cfg: dict[str, Any], tower: dict[str, Any]) -> str:
    if cfg.get("quick_gelu"):
        return "quick_gelu"
    return "gelu_tanh" if (tower.get("act_kwargs") or {}).get("approximate") == "tanh" else "gelu"


def clip_from_open_clip_cfg(cfg: dict[str, Any]) -> CLIP:
    """Builds a (randomly initialised) vlm :class:`CLIP` with the architecture of an open_clip ``model_cfg``.

    ``cfg`` is open_clip's config format (``open_clip.get_model_config("ViT-B-32")``): ``embed_dim``,
    ``quick_gelu``, ``vision_cfg``, ``text_cfg``, optionally ``init_logit_bias``.
    """
    _check_cfg(cfg)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    image_size, patch_size = v.get("image_size", 224), v.get("patch_size", 16)
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise UnsupportedModelError(f"non-square image size {image_size}")
        image_size = image_size[0]
    vision_width = v.get("width", 768)
    vision = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        width=vision_width,
        depth=v.get("layers", 12),
        num_heads=vision_width // v.get("head_width", 64),
        mlp_ratio=v.get("mlp_ratio", 4.0),
        qkv_bias=True,
        class_token=True,
        pool="avg" if v.get("pool_type", "tok") == "avg" else "token",
        pre_norm=not v.get("no_ln_pre", False),
        fc_norm=bool(v.get("final_ln_after_pool", False)),
        patch_bias=False,
        act=_act_name(cfg, v),
        norm_eps=(v.get("norm_kwargs") or {}).get("eps", 1e-5),
        layer_scale=v.get("ls_init_value"),
        patch_dropout=v.get("patch_dropout", 0.0),
    )
    vocab_size = t.get("vocab_size", 49408)
    text = TextTransformer(
        vocab_size=vocab_size,
        context_length=t.get("context_length", 77),
        width=t.get("width", 512),
        depth=t.get("layers", 12),
        num_heads=t.get("heads", 8),
        mlp_ratio=t.get("mlp_ratio", 4.0),
        act=_act_name(cfg, t),
        norm_eps=(t.get("norm_kwargs") or {}).get("eps", 1e-5),
        # argmax pooling = the highest token id, i.e. the end-of-text token of the CLIP vocabulary
        eot_token_id=vocab_size - 1 if t.get("pool_type", "argmax") == "argmax" else t.get("eos_id", 2),
        layer_scale=t.get("ls_init_value"),
    )
    kwargs = {}
    if cfg.get("init_logit_scale") is not None:
        kwargs["init_logit_scale"] = float(cfg["init_logit_scale"])
    return CLIP(vision, text, embed_dim=cfg["embed_dim"], init_logit_bias=cfg.get("init_logit_bias"), **kwargs)


def open_clip_cfg_from_model(model: nn.Module) -> dict[str, Any]:
    """Reads the open_clip ``model_cfg`` of an open_clip ``CLIP`` / ``CustomTextCLIP`` off its modules."""
    from open_clip.transformer import ResidualAttentionBlock
    from open_clip.transformer import TextTransformer as OCText
    from open_clip.transformer import VisionTransformer as OCViT

    visual = getattr(model, "visual", None)
    if not isinstance(visual, OCViT):
        raise UnsupportedModelError(
            f"the image tower is {type(visual).__name__}; vlm converts open_clip's VisionTransformer towers only"
        )
    text = model.text if hasattr(model, "text") else model
    if hasattr(model, "text") and not isinstance(model.text, OCText):
        raise UnsupportedModelError(f"the text tower is {type(model.text).__name__}; vlm converts open_clip's "
                                    "TextTransformer (use vlm.models.hf_text.HFTextEncoder for Hugging Face towers)")
    if visual.attn_pool is not None:
        raise UnsupportedModelError("vlm's CLIP cannot express this open_clip model: attentional pooling")
    v_blocks, t_blocks = visual.transformer.resblocks, text.transformer.resblocks
    for where, blocks in (("image", v_blocks), ("text", t_blocks)):
        if any(type(b) is not ResidualAttentionBlock for b in blocks):
            features = ", ".join(_custom_block_features(blocks[0])) or "block_type='custom'"
            raise UnsupportedModelError(f"custom {where} attention blocks ({type(blocks[0]).__name__}: {features})")
    v_act, t_act = activation_name(v_blocks[0].mlp.gelu), activation_name(t_blocks[0].mlp.gelu)
    if "quick_gelu" in (v_act, t_act) and v_act != t_act:
        raise UnsupportedModelError(f"mixed activations ({v_act} image, {t_act} text)")
    v_width, t_width = visual.conv1.out_channels, text.transformer.width
    ln_post_after_pool = bool(getattr(visual, "final_ln_after_pool", False))
    vision_cfg = dict(
        image_size=list(visual.image_size) if visual.image_size[0] != visual.image_size[1] else visual.image_size[0],
        patch_size=visual.patch_size[0],
        width=v_width,
        layers=len(v_blocks),
        head_width=v_width // v_blocks[0].attn.num_heads,
        mlp_ratio=v_blocks[0].mlp.c_fc.out_features / v_width,
        ls_init_value=_ls_value(v_blocks[0].ls_1),
        patch_dropout=float(getattr(visual.patch_dropout, "prob", 0.0)),
        no_ln_pre=is_identity(visual.ln_pre),
        pool_type=visual.pool_type,
        final_ln_after_pool=ln_post_after_pool,
        norm_kwargs={"eps": layer_norm_eps(visual.ln_post, v_width, "visual.ln_post")},
        act_kwargs={"approximate": "tanh"} if v_act == "gelu_tanh" else None,
    )
    if visual.conv1.bias is not None or visual.conv1.in_channels != 3:
        raise UnsupportedModelError("an image tower whose patch convolution has a bias or other than 3 channels")
    proj = text.text_projection
    pool_type = getattr(text, "pool_type", None) or getattr(model, "text_pool_type", "argmax")
    eos_id = getattr(text, "eos_id", None) if hasattr(model, "text") else getattr(model, "text_eos_id", None)
    text_cfg = dict(
        context_length=text.positional_embedding.shape[0],
        vocab_size=text.token_embedding.num_embeddings,
        width=t_width,
        heads=t_blocks[0].attn.num_heads,
        layers=len(t_blocks),
        mlp_ratio=t_blocks[0].mlp.c_fc.out_features / t_width,
        ls_init_value=_ls_value(t_blocks[0].ls_1),
        embed_cls=getattr(text, "cls_emb", None) is not None,
        no_causal_mask=getattr(text, "attn_mask", None) is None,
        pool_type=pool_type,
        eos_id=eos_id if eos_id is not None else 2,
        proj_bias=isinstance(proj, nn.Linear) and proj.bias is not None,
        proj_type="none" if proj is None else "linear",
        norm_kwargs={"eps": layer_norm_eps(text.ln_final, t_width, "ln_final")},
        act_kwargs={"approximate": "tanh"} if t_act == "gelu_tanh" else None,
    )
    cfg = dict(embed_dim=visual.output_dim, quick_gelu=v_act == "quick_gelu", vision_cfg=vision_cfg, text_cfg=text_cfg)
    if getattr(model, "logit_bias", None) is not None:
        cfg["init_logit_bias"] = float(model.logit_bias.detach().reshape(-1)[0])
    return cfg


def _custom_block_features(block: nn.Module) -> list[str]:
    """The options of an open_clip ``CustomResidualAttentionBlock`` that vlm's Block does not have."""
    attn = block.attn
    checks = {
        "qk_norm": not is_identity(getattr(attn, "ln_q", None)),
        "scaled_cosine_attn": getattr(attn, "scaled_cosine", False),
        "scale_heads": getattr(attn, "scale_heads", False),
        "scale_attn_inner": not is_identity(getattr(attn, "ln_inner", None)),
        "scale_attn": not is_identity(getattr(block, "ln_attn", None)),
        "scale_fc": not is_identity(getattr(block.mlp, "ln", None)),
    }
    return [name for name, on in checks.items() if on]


def _ls_value(ls: nn.Module) -> float | None:
    return None if is_identity(ls) else float(ls.gamma.detach().reshape(-1)[0])


def from_open_clip(model: nn.Module) -> CLIP:
    """Builds a vlm :class:`CLIP` equal to an open_clip ViT ``CLIP`` / ``CustomTextCLIP`` and copies its weights.

    Returns:
        The vlm CLIP in the open_clip model's train/eval mode; ``encode_image`` / ``encode_text`` equal
        open_clip's (same token ids, same images).
    """
    cfg = open_clip_cfg_from_model(model)
    clip = clip_from_open_clip_cfg(cfg)
    sd = open_clip_to_vlm_state_dict(model.state_dict(), fc_norm=cfg["vision_cfg"]["final_ln_after_pool"])
    load_checked(clip, sd, "the vlm CLIP")
    return clip.train(model.training)


def open_clip_cfg(clip: CLIP) -> dict[str, Any]:
    """The open_clip ``model_cfg`` that describes a vlm :class:`CLIP` (for ``open_clip.CLIP(**cfg)``).

    Raises:
        UnsupportedModelError: the model uses something open_clip's CLIP cannot express (an HF text tower, a ViT
            without class token or with a patch bias, different activations per tower...).
    """
    vision, text = clip.vision, clip.text
    if not isinstance(vision, VisionTransformer) or not isinstance(text, TextTransformer):
        raise UnsupportedModelError(
            f"open_clip's CLIP needs a VisionTransformer and a TextTransformer, not {type(vision).__name__} and "
            f"{type(text).__name__}"
        )
    vb, tb = vision.blocks[0], text.blocks[0]
    v_act, t_act = activation_name(vb.mlp.act), activation_name(tb.mlp.act)
    found = []
    if vision.cls_token is None:
        found.append("an image tower without class token")
    if vision.stem != "patch":
        found.append(f"a {vision.stem!r} stem (open_clip ViTs patchify with one convolution)")
    elif vision.patch_embed.proj.bias is not None:
        found.append("a bias on the patch convolution (open_clip's conv1 has none; build with patch_bias=False)")
    elif vision.patch_embed.proj.in_channels != 3:
        found.append("images with other than 3 channels")
    if vb.attn.qkv.bias is None:
        found.append("attention without qkv bias")
    if "quick_gelu" in (v_act, t_act) and v_act != t_act:
        found.append(f"different activations per tower ({v_act}, {t_act})")
    if "relu" in (v_act, t_act):
        found.append("ReLU activations")
    if is_identity(vision.norm) and is_identity(vision.fc_norm):
        found.append("an image tower without final norm")
    if found:
        raise UnsupportedModelError("open_clip's CLIP cannot express this vlm CLIP: " + "; ".join(found))

    def tower_extras(act: str, eps: float) -> dict[str, Any]:
        return dict(norm_kwargs={"eps": eps}, act_kwargs={"approximate": "tanh"} if act == "gelu_tanh" else None)

    vision_cfg = dict(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        width=vision.width,
        layers=len(vision.blocks),
        head_width=vision.width // vb.attn.num_heads,
        mlp_ratio=vb.mlp.fc1.out_features / vision.width,
        ls_init_value=float(vb.ls1.gamma.detach()[0]) if isinstance(vb.ls1, LayerScale) else None,
        patch_dropout=vision.patch_dropout,
        no_ln_pre=is_identity(vision.norm_pre),
        pool_type="avg" if vision.pool == "avg" else "tok",
        final_ln_after_pool=not is_identity(vision.fc_norm),
        **tower_extras(v_act, float(vb.norm1.eps)),
    )
    text_cfg = dict(
        context_length=text.context_length,
        vocab_size=text.vocab_size,
        width=text.width,
        heads=tb.attn.num_heads,
        layers=len(text.blocks),
        mlp_ratio=tb.mlp.fc1.out_features / text.width,
        ls_init_value=float(tb.ls1.gamma.detach()[0]) if isinstance(tb.ls1, LayerScale) else None,
        **tower_extras(t_act, float(tb.norm1.eps)),
    )
    if text.eot_token_id != text.vocab_size - 1:
        # argmax pooling (open_clip's default) finds the EOT only when it is the highest id; otherwise name it
        text_cfg.update(pool_type="eos", eos_id=text.eot_token_id)
    for c in (vision_cfg, text_cfg):  # keep configs minimal: drop what equals open_clip's default
        if c["act_kwargs"] is None:
            del c["act_kwargs"]
        if c["ls_init_value"] is None:
            del c["ls_init_value"]
    cfg: dict[str, Any] = dict(embed_dim=clip.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
    if v_act == "quick_gelu":
        cfg["quick_gelu"] = True
    if clip.logit_bias is not None:
        cfg["init_logit_bias"] = float(clip.logit_bias.detach())
    return cfg


def to_open_clip(clip: CLIP) -> nn.Module:
    """Builds an open_clip ``CLIP`` equal to a vlm :class:`CLIP` and copies the weights (train/eval mode kept)."""
    import open_clip

    cfg = open_clip_cfg(clip)
    model = open_clip.CLIP(**cfg)
    sd = vlm_to_open_clip_state_dict(clip.state_dict())
    sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    if "logit_bias" in sd:
        sd["logit_bias"] = sd["logit_bias"].reshape(model.logit_bias.shape)
    load_checked(model, sd, "the open_clip CLIP")
    return model.train(clip.training)


__all__ = [
    "clip_from_open_clip_cfg",
    "from_open_clip",
    "open_clip_cfg",
    "open_clip_cfg_from_model",
    "to_open_clip",
]
