"""A peer library's model from a local weights file, as ``vlm.load("open_clip:<arch>" | "timm:<name>", weights=...)``
serves it: open_clip CLIPs as a zero-shot model, timm ViTs as an image embedder (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vlm.data.files import UnsafeFileError, check_regular
from vlm.data.tokenizer import CLIPTokenizer
from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlm.formats import CheckpointError
from vlm.interop.open_clip_files import load_open_clip_state_dict
from vlm.interop.timm import from_timm
from vlm.interop.weights import ConversionError, read_state_dict
from vlm.zero_shot import ZeroShotModel


@dataclass
class PeerVision:
    """A timm ViT converted to vlm's, with the input statistics of its pretrained config."""

    model: nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def open_peer(source: str, weights: Path) -> ZeroShotModel | PeerVision:
    """``open_clip:<arch>`` (a :class:`~vlm.zero_shot.ZeroShotModel`) or ``timm:<name>`` (a :class:`PeerVision`) with
    its local ``weights``. Raises :class:`~vlm.formats.CheckpointError` naming both for any file or conversion
    problem."""
    try:
        check_regular(weights, "weights file")
        library, _, name = source.partition(":")
        if library == "open_clip":
            model = load_open_clip_state_dict(weights, model_cfg=name)
            return ZeroShotModel(model, CLIPTokenizer(model.text.context_length), "openai", OPENAI_CLIP_MEAN,
                                 OPENAI_CLIP_STD)  # fmt: skip
        import timm

        peer = timm.create_model(name, pretrained=False, num_classes=0)
        state = {k: v for k, v in read_state_dict(weights).items() if not k.startswith("head.")}
        peer.load_state_dict(state, strict=True)
        cfg = peer.pretrained_cfg
        vit = from_timm(peer.eval())
        return PeerVision(vit, vit.image_size, tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
                          tuple(cfg.get("std", OPENAI_CLIP_STD)))  # fmt: skip
    except (UnsafeFileError, ConversionError, RuntimeError) as e:
        raise CheckpointError(f"{source} with {weights}: {str(e).splitlines()[0]}") from None


__all__ = ["PeerVision", "open_peer"]
