"""Weights in and out of vlm: timm and open_clip models, their state dicts and files (vlm's own files: vlm.formats).

The user builds the peer model (with its pretrained weights where they have them) and converts:

- :func:`from_timm` / :func:`to_timm`: timm ``VisionTransformer`` <-> vlm ``VisionTransformer``;
- :func:`from_open_clip` / :func:`to_open_clip`: open_clip ViT ``CLIP`` <-> vlm ``CLIP``;
- :func:`load_open_clip_state_dict` / :func:`save_open_clip`: open_clip checkpoint files;
- :func:`load_weights`: any supported state dict or file into an existing vlm module;

Every conversion is checked: unsupported features and mismatched shapes raise errors that name them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from vlm.interop.open_clip import from_open_clip, to_open_clip
from vlm.interop.open_clip_files import is_open_clip_state_dict, load_open_clip_state_dict, save_open_clip
from vlm.interop.open_clip_keys import open_clip_to_vlm_state_dict
from vlm.interop.timm import from_timm, to_timm, vit_from_timm_state_dict
from vlm.interop.weights import (
    FAMILIES,
    ConversionError,
    ShapeMismatchError,
    UnsupportedModelError,
    load_checked,
    read_state_dict,
    supported_families,
)


def detect_family(sd: Mapping[str, Tensor]) -> str:
    """Which family a state dict belongs to (a key of :data:`FAMILIES`).

    Raises:
        UnsupportedModelError: none of them; the message lists the supported families.
    """
    keys = set(sd)
    if "vision.patch_embed.proj.weight" in keys and "text_proj.weight" in keys:
        return "vlm_clip"
    if any(k.startswith("model.") for k in keys) and any(k.startswith("model.vision.") for k in keys):
        return "vlm_task"
    if is_open_clip_state_dict(sd):
        return "open_clip"
    if "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys:
        return "timm_vit"
    sample = ", ".join(sorted(keys)[:3])
    raise UnsupportedModelError(
        f"unrecognised state dict (keys like {sample}); supported families: {supported_families()}"
    )


def load_weights(module: nn.Module, source: str | Path | Mapping[str, Tensor]) -> nn.Module:
    """Loads a state dict or weights file of any supported family into an existing vlm module, checked.

    A timm (or vlm) ViT state dict loads into a :class:`~vlm.models.vit.VisionTransformer`, an open_clip or vlm
    CLIP state dict into a :class:`~vlm.models.clip.CLIP`. A checkpoint that does not fit ``module`` raises
    :class:`ShapeMismatchError` naming the first mismatched key and both shapes.
    """
    from vlm.models.clip import CLIP
    from vlm.models.vit import VisionTransformer

    sd = read_state_dict(source)
    family = detect_family(sd)
    if family == "open_clip":
        if not isinstance(module, CLIP):
            raise ConversionError(f"an open_clip CLIP checkpoint loads into a vlm CLIP, not a {type(module).__name__}")
        sd = open_clip_to_vlm_state_dict(sd, fc_norm=not isinstance(module.vision.fc_norm, nn.Identity))
        if module.logit_bias is None:
            sd.pop("logit_bias", None)
    elif family == "timm_vit":
        if not isinstance(module, VisionTransformer):
            raise ConversionError(f"a ViT checkpoint loads into a vlm VisionTransformer, not a {type(module).__name__}")
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # the classifier is not part of vlm's ViT
    elif family == "vlm_task":
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    return load_checked(module, sd, f"the {type(module).__name__}")


__all__ = [
    "ConversionError",
    "FAMILIES",
    "ShapeMismatchError",
    "UnsupportedModelError",
    "detect_family",
    "from_open_clip",
    "from_timm",
    "load_open_clip_state_dict",
    "load_weights",
    "read_state_dict",
    "save_open_clip",
    "supported_families",
    "to_open_clip",
    "to_timm",
    "vit_from_timm_state_dict",
]
