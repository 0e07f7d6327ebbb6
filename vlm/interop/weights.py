"""Shared pieces of the converters: reading weight files, checking shapes, reading a peer model's parts.

Every converter copies tensors into a freshly built vlm module through :func:`load_checked`, so a checkpoint that
does not fit the chosen architecture fails with one message naming the first mismatched key and both shapes,
instead of PyTorch's list of every size mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from vlm.formats.build import CheckpointError, copy_weights
from vlm.formats.checkpoint import current_weight_names, read_archive
from vlm.formats.export import read_safetensors
from vlm.models.layers import make_activation


class ConversionError(ValueError):
    """A model or checkpoint that cannot be converted; the message says why."""


class UnsupportedModelError(ConversionError):
    """A peer model (or state dict) that uses features vlm's modules do not have."""


class WeightsSourceError(ValueError):
    """A configured weights file (``init_weights``, ``vision_weights``, ...) that is missing or does not fit: the
    user's to fix (train that stage first, point the key elsewhere), so ``vlm fit`` prints it as one line."""


class ShapeMismatchError(ConversionError):
    """A state dict whose keys or shapes do not match the architecture it is loaded into."""


FAMILIES = {
    "open_clip": "open_clip ViT CLIP (visual.conv1.weight, transformer.resblocks.N..., text_projection)",
    "timm_vit": "timm / vlm VisionTransformer (patch_embed.proj.weight, blocks.N.attn.qkv.weight)",
    "vlm_clip": "vlm CLIP (vision.patch_embed.proj.weight, text.blocks.N..., text_proj.weight)",
    "vlm_task": "vlm task checkpoint (model.vision..., as written by vlm fit / vlm export)",
}


def supported_families() -> str:
    """One line naming the state-dict families vlm reads."""
    return "; ".join(FAMILIES.values())


def read_state_dict(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reads a state dict from a ``.safetensors`` file, a torch file (read by :func:`vlm.formats.read_archive`, as
    every checkpoint is: no code runs, sizes bounded) or a mapping.

    Training checkpoints are unwrapped (``state_dict`` / ``model`` / ``module`` entries), a DistributedDataParallel
    ``module.`` prefix is removed, and an earlier vlm's weight names come under today's
    (:func:`vlm.formats.checkpoint.current_weight_names`).
    """
    if isinstance(source, Mapping):
        sd = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConversionError(f"weights file not found: {path}")
        try:  # vlm.formats' readers: of torch files, size, zip members and unpickling all checked
            sd = read_safetensors(path) if path.suffix == ".safetensors" else read_archive(path, "weights file")
        except CheckpointError as e:
            raise ConversionError(str(e)) from None
        if not isinstance(sd, Mapping):
            raise ConversionError(f"{path} holds a {type(sd).__name__}, not a state dict")
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = dict(sd[wrapper])
    if not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ConversionError("not a state dict: expected a mapping of parameter names to tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return current_weight_names(sd)  # an earlier vlm's names under today's


def sub_state_dict(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` (e.g. ``model.vision.`` of a training checkpoint), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_checked(module: nn.Module, state_dict: Mapping[str, Tensor], what: str = "the model") -> nn.Module:
    """Copies ``state_dict`` into ``module`` through :func:`vlm.formats.copy_weights`, the one checked copy (every
    key, every shape), a mismatch raising :class:`ShapeMismatchError`; returns ``module``."""
    return copy_weights(module, state_dict, "the checkpoint", what, ShapeMismatchError)


def activation_name(act: nn.Module) -> str:
    """The vlm name (see :func:`vlm.models.layers.make_activation`) of an activation module, found by evaluating it.

    Comparing outputs instead of class names recognises ``nn.GELU``, timm's and open_clip's GELU / QuickGELU
    classes and ``functools.partial`` variants alike.
    """
    x = torch.linspace(-6, 6, 241)
    with torch.no_grad():
        y = act(x.clone())
        for name in ("gelu", "gelu_tanh", "quick_gelu", "relu"):
            if torch.allclose(y, make_activation(name)(x), rtol=0, atol=1e-6):
                return name
    raise UnsupportedModelError(f"unsupported activation {act!r}; vlm has gelu, gelu_tanh, quick_gelu and relu")


def layer_norm_eps(norm: nn.Module, width: int, where: str) -> float:
    """The epsilon of an affine ``nn.LayerNorm`` over ``width`` channels (anything else is unsupported)."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        raise UnsupportedModelError(f"{where} is {type(norm).__name__}; vlm supports affine LayerNorm only")
    if tuple(norm.normalized_shape) != (width,):
        raise UnsupportedModelError(f"{where} normalises {tuple(norm.normalized_shape)}, expected ({width},)")
    return float(norm.eps)


def is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


__all__ = [
    "FAMILIES",
    "ConversionError",
    "ShapeMismatchError",
    "UnsupportedModelError",
    "WeightsSourceError",
    "activation_name",
    "layer_norm_eps",
    "load_checked",
    "read_state_dict",
    "sub_state_dict",
    "supported_families",
]
