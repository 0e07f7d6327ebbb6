"""The state-dict key map between open_clip's ViT-based CLIP and vlm's :class:`~vlm.models.clip.CLIP`.

open_clip's names map one to one onto vlm's (the image tower is open_clip's ``visual.``, vlm's ``vision.``; a
learned position embedding is open_clip's ``positional_embedding``, vlm's ``pos_embed`` in both towers):

==========================================================  ==============================================
open_clip                                                    vlm :class:`~vlm.models.clip.CLIP`
==========================================================  ==============================================
``visual.conv1`` (no bias)                                   ``vision.patch_embed.proj``
``visual.class_embedding`` (d)                               ``vision.cls_token`` (1, 1, d)
``visual.positional_embedding`` (n, d)                       ``vision.pos_embed`` (1, n, d)
``visual.ln_pre``                                            ``vision.norm_pre``
``[visual.]transformer.resblocks.N.ln_1 / ln_2``             ``vision.|text.blocks.N.norm1 / norm2``
``....attn.in_proj_weight`` (q, k, v stacked, as ours)       ``....attn.qkv.weight``
``....attn.out_proj``                                        ``....attn.proj``
``....mlp.c_fc / c_proj``, ``ls_1 / ls_2``                   ``....mlp.fc1 / fc2``, ``ls1 / ls2``
``visual.ln_post``                                           ``vision.norm`` (or ``fc_norm`` after pooling)
``visual.proj`` (width, embed): ``x @ proj``                 ``vision_proj.weight`` = ``proj.T``
``token_embedding``, ``ln_final``                            ``text.`` + the same names
``positional_embedding`` (context, d)                        ``text.pos_embed`` (context, d)
``text_projection`` (width, embed)                           ``text_proj.weight`` = ``text_projection.T``
``logit_scale``, ``logit_bias``                              the same
==========================================================  ==============================================

"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from vlm.interop.weights import UnsupportedModelError

_BLOCK_KEYS = {  # open_clip ResidualAttentionBlock -> vlm Block
    "ln_1.": "norm1.",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.": "attn.proj.",
    "ls_1.": "ls1.",
    "ln_2.": "norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "ls_2.": "ls2.",
}
_VISUAL_KEYS = {"conv1.": "patch_embed.proj.", "ln_pre.": "norm_pre."}
_TEXT_ROOT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _block_key(rest: str) -> str | None:
    for src, dst in _BLOCK_KEYS.items():
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return None


def text_at_root(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CustomTextCLIP keeps the text tower under ``text.``; CLIP at the root. Returns the root layout."""
    if not any(k.startswith("text.") for k in sd):
        return dict(sd)
    return {k[len("text.") :] if k.startswith("text.") else k: v for k, v in sd.items()}


def open_clip_to_vlm_state_dict(sd: Mapping[str, Tensor], fc_norm: bool = False) -> dict[str, Tensor]:
    """Renames an open_clip ViT CLIP state dict to vlm's :class:`CLIP` names (see the module table).

    Args:
        sd: open_clip ``CLIP`` or ``CustomTextCLIP`` state dict.
        fc_norm: the model applies ``ln_post`` after pooling (``final_ln_after_pool``): it becomes ``fc_norm``.

    Raises:
        UnsupportedModelError: a key that has no place in vlm's CLIP (the first is named).
    """
    out: dict[str, Tensor] = {}
    for key, value in text_at_root(sd).items():
        new = None
        if key.startswith("visual."):
            rest = key[len("visual.") :]
            if rest == "class_embedding":
                new, value = "vision.cls_token", value.reshape(1, 1, -1)
            elif rest == "positional_embedding":
                new, value = "vision.pos_embed", value.unsqueeze(0)
            elif rest == "proj":
                new, value = "vision_proj.weight", value.T
            elif rest.startswith("ln_post."):
                new = ("vision.fc_norm." if fc_norm else "vision.norm.") + rest[len("ln_post.") :]
            elif rest.startswith("transformer.resblocks."):
                idx, _, tail = rest[len("transformer.resblocks.") :].partition(".")
                mapped = _block_key(tail)
                new = f"vision.blocks.{idx}.{mapped}" if mapped else None
            else:
                new = next((f"vision.{d}{rest[len(s):]}" for s, d in _VISUAL_KEYS.items() if rest.startswith(s)), None)
        elif key == "text_projection":
            new, value = "text_proj.weight", value.T
        elif key in ("logit_scale", "logit_bias"):
            new, value = key, value.reshape(())
        elif key.startswith("transformer.resblocks."):
            idx, _, tail = key[len("transformer.resblocks.") :].partition(".")
            mapped = _block_key(tail)
            new = f"text.blocks.{idx}.{mapped}" if mapped else None
        elif key.startswith(("token_embedding.", "ln_final.")):
            new = "text." + key
        elif key == "positional_embedding":
            new = "text.pos_embed"
        elif key in ("attn_mask", "input_resolution", "context_length", "vocab_size"):
            continue  # the causal mask and metadata that OpenAI's (JIT) checkpoints carry: nothing to load
        if new is None:
            raise UnsupportedModelError(f"open_clip key {key!r} has no counterpart in vlm's CLIP")
        out[new] = value.contiguous()
    return out


def vlm_to_open_clip_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Renames a vlm :class:`CLIP` state dict to open_clip's ``CLIP`` names (text tower at the root)."""
    inverse_block = {v: k for k, v in _BLOCK_KEYS.items()}
    inverse_visual = {v: k for k, v in _VISUAL_KEYS.items()}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        new = None
        if key.startswith(("vision.", "text.")):
            tower, _, rest = key.partition(".")
            prefix = "visual." if tower == "vision" else ""
            if rest.startswith("blocks."):
                idx, _, tail = rest[len("blocks.") :].partition(".")
                mapped = next((o + tail[len(v) :] for v, o in inverse_block.items() if tail.startswith(v)), None)
                new = f"{prefix}transformer.resblocks.{idx}.{mapped}" if mapped else None
            elif tower == "text":
                new = "positional_embedding" if rest == "pos_embed" else rest
            elif rest == "cls_token":
                new, value = "visual.class_embedding", value.reshape(-1)
            elif rest == "pos_embed":
                new, value = "visual.positional_embedding", value[0]
            elif rest.startswith(("norm.", "fc_norm.")):
                new = "visual.ln_post." + rest.partition(".")[2]
            else:
                mapped = next((o + rest[len(v) :] for v, o in inverse_visual.items() if rest.startswith(v)), None)
                new = f"visual.{mapped}" if mapped else None
        elif key == "vision_proj.weight":
            new, value = "visual.proj", value.T
        elif key == "text_proj.weight":
            new, value = "text_projection", value.T
        elif key in ("logit_scale", "logit_bias"):
            new = key
        if new is None:
            raise UnsupportedModelError(f"vlm key {key!r} has no counterpart in open_clip's CLIP")
        out[new] = value.contiguous()
    return out


# ------------------------------------------------------------------------------------------ open_clip configs


__all__ = ["open_clip_to_vlm_state_dict", "text_at_root", "vlm_to_open_clip_state_dict"]
