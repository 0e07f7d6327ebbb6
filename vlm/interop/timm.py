"""timm Vision Transformers in and out of vlm.

vlm's :class:`~vlm.models.vit.VisionTransformer` keeps timm's parameter names (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``norm_pre``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}``, ``norm``,
``fc_norm``), so converting is reading the architecture off the timm modules and copying the state dict as is.
The classifier ``head`` is not converted: vlm's ViT returns the pooled features (timm's ``pre_logits``).

What vlm's ViT cannot express (register tokens, qk-norm, position embeddings that skip the class token, dynamic
padding, attention / MAP pooling, other block types...) is refused with a message naming each such feature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlm.interop.weights import (
    UnsupportedModelError,
    activation_name,
    is_identity,
    layer_norm_eps,
    load_checked,
    read_state_dict,
)
from vlm.models.layers import LayerScale
from vlm.models.vit import VisionTransformer, resample_pos_embed


def _timm_vit_class() -> type[nn.Module]:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    return TimmViT


def _unsupported_features(m: nn.Module) -> list[str]:
    """Every feature of the timm ViT ``m`` that vlm's VisionTransformer does not have."""
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block

    found = []
    if type(m) is not _timm_vit_class():
        found.append(f"model class {type(m).__name__} (only timm's VisionTransformer itself is supported)")
    if getattr(m, "num_reg_tokens", 0):
        found.append(f"register tokens (reg_tokens={m.num_reg_tokens})")
    if getattr(m, "no_embed_class", False):
        found.append("position embeddings without the class token (no_embed_class=True)")
    if m.pos_embed is None:
        found.append("no learned position embedding (pos_embed='none')")
    if m.global_pool not in ("token", "avg") or m.attn_pool is not None:
        found.append(f"global_pool={m.global_pool!r} (vlm pools with 'token' or 'avg')")
    if getattr(m, "pool_include_prefix", False):
        found.append("average pooling over the prefix tokens too (pool_include_prefix=True)")
    if is_identity(m.norm) and is_identity(m.fc_norm):
        found.append("no final norm (final_norm=False)")
    pe = m.patch_embed
    if type(pe) is not PatchEmbed:
        found.append(f"patch embedding {type(pe).__name__}")
    else:
        if pe.dynamic_img_pad:
            found.append("dynamic image padding (dynamic_img_pad=True)")
        if not is_identity(pe.norm):
            found.append("a norm in the patch embedding (embed_norm_layer)")
        if pe.patch_size[0] != pe.patch_size[1] or pe.img_size[0] != pe.img_size[1]:
            found.append(f"non-square patches or images (patch {pe.patch_size}, image {pe.img_size})")
    for i, blk in enumerate(m.blocks):
        if type(blk) is not Block:
            found.append(f"block type {type(blk).__name__} (blocks.{i})")
            break
        attn, mlp = blk.attn, blk.mlp
        if type(attn) is not Attention:
            found.append(f"attention type {type(attn).__name__}")
        else:
            if not (is_identity(attn.q_norm) and is_identity(attn.k_norm)):
                found.append("qk_norm")
            if not is_identity(attn.norm):
                found.append("a norm inside attention (scale_attn_norm)")
            if getattr(attn, "gate", None) is not None:
                found.append("gated attention")
            if attn.proj.bias is None:
                found.append("no bias on the attention output projection (proj_bias=False)")
            if attn.head_dim * attn.num_heads != attn.qkv.in_features:
                found.append(f"attention width {attn.head_dim * attn.num_heads} != model width")
        if type(mlp) is not Mlp:
            found.append(f"MLP type {type(mlp).__name__} (e.g. SwiGLU)")
        elif not is_identity(mlp.norm) or mlp.fc1.bias is None or mlp.fc2.bias is None:
            found.append("an MLP with an inner norm or without biases")
        if type(blk.ls1) is not type(blk.ls2):
            found.append("LayerScale on only one residual branch")
        if found:
            break
    return list(dict.fromkeys(found))


def vit_config_from_timm(m: nn.Module) -> dict[str, Any]:
    """The :class:`VisionTransformer` constructor arguments that reproduce the timm ViT ``m``.

    Raises:
        UnsupportedModelError: ``m`` uses features vlm's ViT does not have (each one is named).
    """
    found = _unsupported_features(m)
    if found:
        raise UnsupportedModelError("cannot convert this timm model to vlm's VisionTransformer: " + "; ".join(found))
    pe, blk0 = m.patch_embed, m.blocks[0]
    width = m.embed_dim
    hidden = blk0.mlp.fc1.out_features
    eps = {layer_norm_eps(blk0.norm1, width, "blocks.0.norm1")}
    for name in ("norm_pre", "norm", "fc_norm"):
        if not is_identity(getattr(m, name)):
            eps.add(layer_norm_eps(getattr(m, name), width, name))
    for i, blk in enumerate(m.blocks):
        eps.add(layer_norm_eps(blk.norm1, width, f"blocks.{i}.norm1"))
        eps.add(layer_norm_eps(blk.norm2, width, f"blocks.{i}.norm2"))
    if len(eps) > 1:
        raise UnsupportedModelError(f"LayerNorms with different epsilons {sorted(eps)}; vlm uses one")
    mlp_ratio = hidden / width
    if int(width * mlp_ratio) != hidden:
        raise UnsupportedModelError(f"MLP width {hidden} is not expressible as int(width * mlp_ratio)")
    last = m.blocks[-1]
    return dict(
        image_size=pe.img_size[0],
        patch_size=pe.patch_size[0],
        in_chans=pe.proj.in_channels,
        width=width,
        depth=len(m.blocks),
        num_heads=blk0.attn.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=blk0.attn.qkv.bias is not None,
        class_token=m.cls_token is not None,
        pool=m.global_pool,
        pre_norm=not is_identity(m.norm_pre),
        fc_norm=not is_identity(m.fc_norm),
        patch_bias=pe.proj.bias is not None,
        act=activation_name(blk0.mlp.act),
        norm_eps=eps.pop(),
        layer_scale=None if is_identity(blk0.ls1) else float(getattr(blk0.ls1, "init_values", 1e-5)),
        drop_path=float(getattr(last.drop_path1, "drop_prob", 0.0)),
        patch_dropout=float(getattr(m.patch_drop, "prob", 0.0)),
    )


def _backbone_state_dict(m: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in m.state_dict().items() if not k.startswith("head.")}


def _with_image_size(sd: dict[str, Tensor], cfg: dict[str, Any], image_size: int | None) -> dict[str, Tensor]:
    """Resamples the position embedding to ``image_size`` (bicubic, antialiased: timm's ``resample_abs_pos_embed``)."""
    if image_size is None or image_size == cfg["image_size"]:
        return sd
    if image_size % cfg["patch_size"]:
        raise ValueError(f"image_size {image_size} is not divisible by the patch size {cfg['patch_size']}")
    grid = image_size // cfg["patch_size"]
    sd = dict(sd)
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (grid, grid), 1 if cfg["class_token"] else 0)
    cfg["image_size"] = image_size
    return sd


def from_timm(timm_model: nn.Module, image_size: int | None = None) -> VisionTransformer:
    """Builds a vlm :class:`VisionTransformer` equal to a timm ``VisionTransformer`` and copies its weights.

    Args:
        timm_model: a ``timm.models.vision_transformer.VisionTransformer`` (pretrained or not).
        image_size: train/serve at this image size instead of the timm model's; the position embedding is
            resampled bicubically once here, exactly as timm's ``set_input_size`` does.

    Returns:
        The vlm ViT, in the timm model's train/eval mode. Its ``forward`` equals timm's
        ``forward_head(forward_features(x), pre_logits=True)``; the classifier head is not copied.
    """
    cfg = vit_config_from_timm(timm_model)
    sd = _with_image_size(_backbone_state_dict(timm_model), cfg, image_size)
    vit = VisionTransformer(**cfg)
    load_checked(vit, sd, "the vlm VisionTransformer")
    return vit.train(timm_model.training)


def vit_config(vit: VisionTransformer) -> dict[str, Any]:
    """The constructor arguments of an existing vlm :class:`VisionTransformer`, read off its modules."""
    if vit.stem != "patch":
        raise UnsupportedModelError(f"a ViT with a {vit.stem!r} stem has no timm equivalent (timm patchifies with one "
                                    "convolution)")
    blk0 = vit.blocks[0]
    width = vit.width
    conv = vit.patch_embed.proj
    return dict(
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        in_chans=conv.in_channels,
        width=width,
        depth=len(vit.blocks),
        num_heads=blk0.attn.num_heads,
        mlp_ratio=blk0.mlp.fc1.out_features / width,
        qkv_bias=blk0.attn.qkv.bias is not None,
        class_token=vit.cls_token is not None,
        pool=vit.pool,
        pre_norm=not is_identity(vit.norm_pre),
        fc_norm=not is_identity(vit.fc_norm),
        patch_bias=conv.bias is not None,
        act=activation_name(blk0.mlp.act),
        norm_eps=float(blk0.norm1.eps),
        layer_scale=float(blk0.ls1.gamma.detach().flatten()[0]) if isinstance(blk0.ls1, LayerScale) else None,
        drop_path=float(getattr(vit.blocks[-1].drop_path1, "p", 0.0)),
        patch_dropout=vit.patch_dropout,
    )


def to_timm(vit: VisionTransformer, **timm_kwargs: Any) -> nn.Module:
    """Builds a timm ``VisionTransformer`` equal to a vlm ViT (no classifier head) and copies the weights.

    Args:
        vit: the vlm VisionTransformer.
        **timm_kwargs: extra timm constructor arguments, e.g. ``dynamic_img_size=True`` to accept any input size
            as vlm's ViT does, or dropout rates for fine-tuning.

    Returns:
        The timm model, in ``vit``'s train/eval mode; ``timm_model.forward_features`` / ``forward_head(...,
        pre_logits=True)`` reproduce ``vit.forward_tokens`` / ``vit.forward``.
    """
    from timm.layers import LayerNorm as TimmLayerNorm

    cfg = vit_config(vit)
    kwargs: dict[str, Any] = dict(
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        in_chans=cfg["in_chans"],
        num_classes=0,
        global_pool=cfg["pool"],
        embed_dim=cfg["width"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=cfg["qkv_bias"],
        init_values=cfg["layer_scale"],
        class_token=cfg["class_token"],
        pre_norm=cfg["pre_norm"],
        fc_norm=cfg["fc_norm"],
        norm_layer=partial(TimmLayerNorm, eps=cfg["norm_eps"]),
        act_layer=cfg["act"],
        drop_path_rate=cfg["drop_path"],
        patch_drop_rate=cfg["patch_dropout"],
    )
    kwargs.update(timm_kwargs)
    model = _timm_vit_class()(**kwargs)
    conv = model.patch_embed.proj
    if (conv.bias is not None) != cfg["patch_bias"]:
        # timm ties the patch-embedding bias to pre_norm (CLIP-style towers have no bias); vlm sets it separately.
        model.patch_embed.proj = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=cfg["patch_bias"]
        )
    load_checked(model, vit.state_dict(), "the timm VisionTransformer")
    return model.train(vit.training)


_UNSUPPORTED_KEYS = {
    "reg_token": "register tokens",
    "dist_token": "a distillation token (DeiT)",
    "attn_pool.": "attention (MAP) pooling",
    ".q_norm.": "qk_norm",
    ".attn.norm.": "a norm inside attention",
    ".mlp.norm.": "a norm inside the MLP",
    ".mlp.fc1_g.": "a gated MLP (SwiGLU)",
    ".mlp.w12.": "a gated MLP (SwiGLU)",
    "head_dist.": "a distillation head",
    "patch_embed.norm.": "a norm in the patch embedding",
    "rope": "rotary position embeddings",
}


def vit_from_timm_state_dict(
    source: str | Path | Mapping[str, Tensor],
    num_heads: int | None = None,
    image_size: int | None = None,
    pool: str | None = None,
    act: str = "gelu",
    norm_eps: float = 1e-6,
) -> VisionTransformer:
    """Builds a vlm ViT from a timm ViT state dict (or file) alone, reading the architecture off the shapes.

    Head count, activation and epsilon are not recorded in a state dict; timm's ViTs use 64-wide heads, GELU and
    eps 1e-6, which are the defaults here. When the timm model name is known, building it with
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path})`` and calling
    :func:`from_timm` reads everything from the model instead.

    Args:
        source: a timm ``VisionTransformer`` state dict, or a ``.safetensors`` / ``.pth`` / ``.bin`` file of one.
        num_heads: attention heads (default ``width // 64``).
        image_size: resample the position embedding to this image size (default: the checkpoint's).
        pool: ``token`` or ``avg``; default ``avg`` when the checkpoint has ``fc_norm`` or no class token.
        act: MLP activation name.
        norm_eps: LayerNorm epsilon.
    """
    sd = {k: v for k, v in read_state_dict(source).items() if not k.startswith("head.")}
    if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd or "pos_embed" not in sd:
        raise UnsupportedModelError(
            "not a timm VisionTransformer state dict (no patch_embed.proj.weight / blocks.0.attn.qkv.weight / "
            "pos_embed)"
        )
    found = sorted({desc for key in sd for part, desc in _UNSUPPORTED_KEYS.items() if part in key})
    if found:
        raise UnsupportedModelError("this timm checkpoint uses features vlm's ViT does not have: " + ", ".join(found))
    conv = sd["patch_embed.proj.weight"]  # (width, in_chans, p, p)
    width, in_chans, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    class_token = "cls_token" in sd
    prefix = 1 if class_token else 0
    grid = math.isqrt(sd["pos_embed"].shape[1] - prefix)
    if grid * grid != sd["pos_embed"].shape[1] - prefix:
        raise UnsupportedModelError(f"pos_embed of shape {tuple(sd['pos_embed'].shape)} is not a square grid")
    fc_norm = "fc_norm.weight" in sd
    cfg = dict(
        image_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        width=width,
        depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        num_heads=num_heads or max(width // 64, 1),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        class_token=class_token,
        pool=pool or ("avg" if fc_norm or not class_token else "token"),
        pre_norm="norm_pre.weight" in sd,
        fc_norm=fc_norm,
        patch_bias="patch_embed.proj.bias" in sd,
        act=act,
        norm_eps=norm_eps,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in sd else None,
    )
    sd = _with_image_size(sd, cfg, image_size)
    vit = VisionTransformer(**cfg)
    return load_checked(vit, sd, "the vlm VisionTransformer built from the checkpoint's shapes").eval()


__all__ = ["from_timm", "to_timm", "vit_config", "vit_config_from_timm", "vit_from_timm_state_dict"]
