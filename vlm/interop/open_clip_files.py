"""open_clip checkpoint files in and out of vlm.

:func:`load_open_clip_state_dict` reads an open_clip ViT CLIP checkpoint (open_clip's training checkpoints,
``open_clip_model.safetensors``, OpenAI's weights as a state dict) into a vlm :class:`~vlm.models.clip.CLIP`, with
the architecture given as an open_clip config (a model name or dict) or read off the shapes. :func:`save_open_clip`
writes a vlm CLIP as files ``open_clip.create_model`` loads. Key renaming and architecture mapping live in
:mod:`vlm.interop.open_clip`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from vlm.interop.open_clip import clip_from_open_clip_cfg, open_clip_cfg
from vlm.interop.open_clip_keys import open_clip_to_vlm_state_dict, text_at_root, vlm_to_open_clip_state_dict
from vlm.interop.weights import (
    ConversionError,
    UnsupportedModelError,
    load_checked,
    read_state_dict,
    supported_families,
)
from vlm.models.clip import CLIP
from vlm.models.vit import resample_pos_embed


def is_open_clip_state_dict(sd: Mapping[str, Tensor]) -> bool:
    """Whether ``sd`` looks like an open_clip CLIP (any image/text tower) state dict (and not a vlm one)."""
    flat = text_at_root(sd)
    if "text_proj.weight" in flat or "vision_proj.weight" in flat:  # vlm's own names
        return False
    return any(k.startswith("visual.") for k in flat) and ("text_projection" in flat or "logit_scale" in flat)


def open_clip_cfg_from_state_dict(
    sd: Mapping[str, Tensor], quick_gelu: bool = False, head_width: int = 64, text_heads: int | None = None
) -> dict[str, Any]:
    """Infers the open_clip ``model_cfg`` of a ViT CLIP state dict from its shapes.

    Head counts and the activation are not recorded in a state dict: open_clip's ViT configs use 64-wide heads,
    and OpenAI's weights (the ``-quickgelu`` configs) QuickGELU.
    """
    flat = text_at_root(sd)
    if "visual.conv1.weight" not in flat or "visual.transformer.resblocks.0.attn.in_proj_weight" not in flat:
        tower = "a timm tower" if any(k.startswith("visual.trunk.") for k in flat) else (
            "a ResNet tower" if "visual.layer1.0.conv1.weight" in flat else "an unknown image tower")
        raise UnsupportedModelError(f"this open_clip checkpoint has {tower}; vlm converts ViT image towers only")
    if "token_embedding.weight" not in flat or "text_projection" not in flat:
        raise UnsupportedModelError("this open_clip checkpoint has no open_clip TextTransformer text tower "
                                    "(Hugging Face text towers are not converted)")
    for key in flat:
        if key.startswith(("visual.attn_pool", "cls_emb", "visual.trunk")) or ".q_norm." in key or ".ln_inner." in key:
            raise UnsupportedModelError(f"this open_clip checkpoint uses features vlm's CLIP does not have ({key!r})")

    def layers(prefix: str) -> int:
        idx = {int(k[len(prefix) :].split(".")[0]) for k in flat if k.startswith(prefix)}
        return max(idx) + 1

    conv = flat["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(flat["visual.positional_embedding"].shape[0] - 1)
    t_width = flat["ln_final.weight"].shape[0]
    v_fc = flat["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    t_fc = flat["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    cfg: dict[str, Any] = dict(
        embed_dim=flat["text_projection"].shape[1],
        quick_gelu=quick_gelu,
        vision_cfg=dict(
            image_size=grid * patch,
            patch_size=patch,
            width=v_width,
            layers=layers("visual.transformer.resblocks."),
            head_width=head_width,
            mlp_ratio=v_fc / v_width,
            no_ln_pre="visual.ln_pre.weight" not in flat,
        ),
        text_cfg=dict(
            context_length=flat["positional_embedding"].shape[0],
            vocab_size=flat["token_embedding.weight"].shape[0],
            width=t_width,
            heads=text_heads or max(t_width // head_width, 1),
            layers=layers("transformer.resblocks."),
            mlp_ratio=t_fc / t_width,
        ),
    )
    if "visual.transformer.resblocks.0.ls_1.gamma" in flat:
        cfg["vision_cfg"]["ls_init_value"] = 1e-5
    if "transformer.resblocks.0.ls_1.gamma" in flat:
        cfg["text_cfg"]["ls_init_value"] = 1e-5
    if "logit_bias" in flat:
        cfg["init_logit_bias"] = -10.0
    return cfg


def load_open_clip_state_dict(
    source: str | Path | Mapping[str, Tensor],
    model_cfg: str | dict[str, Any] | None = None,
    quick_gelu: bool | None = None,
    image_size: int | None = None,
) -> CLIP:
    """Loads an open_clip ViT CLIP checkpoint (file or state dict) into a vlm :class:`CLIP`, in eval mode.

    Args:
        source: open_clip state dict, or a ``.safetensors`` / ``.pt`` / ``.bin`` file of one (OpenAI's and
            open_clip's own layouts, with or without the training wrapper).
        model_cfg: the architecture: an open_clip model name (``"ViT-B-32-quickgelu"``, read from open_clip's
            bundled configs) or a ``model_cfg`` dict. ``None``: inferred from the shapes (64-wide heads).
            A checkpoint that does not fit the chosen architecture raises :class:`ShapeMismatchError` naming
            the first mismatched key and both shapes.
        quick_gelu: use QuickGELU (OpenAI's weights); ``None`` keeps the config's choice (GELU when inferred).
        image_size: use the model at this image size; the position embedding is resampled bicubically, as
            open_clip's ``force_image_size`` does.
    """
    sd = read_state_dict(source)
    if not is_open_clip_state_dict(sd):
        raise UnsupportedModelError(f"not an open_clip CLIP state dict; supported families: {supported_families()}")
    if isinstance(model_cfg, str):
        import open_clip

        name = model_cfg
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ConversionError(f"open_clip has no model config named {name!r}")
    elif model_cfg is None:
        model_cfg = open_clip_cfg_from_state_dict(sd)
    cfg = json.loads(json.dumps(model_cfg))  # deep copy, never edit the caller's dict
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    vsd = open_clip_to_vlm_state_dict(sd, fc_norm=bool(cfg["vision_cfg"].get("final_ln_after_pool", False)))
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
        grid = image_size // cfg["vision_cfg"].get("patch_size", 16)
        vsd["vision.pos_embed"] = resample_pos_embed(vsd["vision.pos_embed"], (grid, grid), num_prefix=1)
    clip = clip_from_open_clip_cfg(cfg)
    if clip.logit_bias is None:
        vsd.pop("logit_bias", None)
    load_checked(clip, vsd, "the chosen architecture")
    return clip.eval()


def save_open_clip(
    clip: CLIP,
    out_dir: str | Path,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
) -> Path:
    """Writes a vlm CLIP as open_clip files: ``open_clip_model.safetensors`` and ``open_clip_config.json``.

    open_clip loads the directory with ``open_clip.create_model("local-dir:" + out_dir)``, and the weights file
    with ``open_clip.create_model(name, pretrained=out_dir / "open_clip_model.safetensors")`` for any ``name``
    with this architecture (a built-in one, or this config after ``open_clip.add_model_config``). Returns the
    weights file.
    """
    from safetensors.torch import save_file

    cfg = open_clip_cfg(clip)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in vlm_to_open_clip_state_dict(clip.state_dict()).items()}
    weights = out / "open_clip_model.safetensors"
    save_file(sd, str(weights), metadata={"format": "pt"})
    preprocess: dict[str, Any] = {"size": clip.vision.image_size}
    if image_mean is not None:
        preprocess["mean"] = list(image_mean)
    if image_std is not None:
        preprocess["std"] = list(image_std)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    return weights


__all__ = ["is_open_clip_state_dict", "load_open_clip_state_dict", "open_clip_cfg_from_state_dict", "save_open_clip"]
