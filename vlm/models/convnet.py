"""A small convolutional image tower: a drop-in for :class:`~vlm.models.vit.VisionTransformer` in CLIP and Flamingo.

On a few thousand images a from-scratch ViT learns colour at once and shape slowly: it leans on whatever correlates
with shape in the training pairs (a colour never seen with triangles), and names the shape of an unseen
colour-shape pair wrongly. A convolutional network has the locality and translation invariance a ViT must learn
from data; on the same images it learns the shape itself (docs/results.md "Your own data"). This tower is that
network, with the interface the models read:

- ``forward(images) -> (b, width)``: the mean of the last feature map's cells (global average pooling);
- ``forward_tokens(images) -> (b, cells, width)``: the last feature map's cells as tokens (normalised), which a
  Flamingo resampler reads as it reads a ViT's patch tokens;
- ``width``, ``image_size``, :meth:`lock` (LiT).

Each stage is a 3x3 convolution, a normalisation, ReLU and a 2x2 max-pool. GroupNorm (the default) normalises each
image on its own, so, as with the rest of vlm, gradient accumulation and the number of ranks do not change the
result; ``norm="batch"`` trains faster on one device but mixes the images of a micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn


class ConvNet(nn.Module):
    """A stack of (conv 3x3, norm, ReLU, max-pool 2x2) stages.

    Args:
        image_size: the side of the square images it is trained on (the cells of the last map are
            ``image_size / 2**len(channels)`` on a side).
        channels: output channels of each stage; the last is ``width``.
        in_chans: input channels.
        norm: ``group`` (GroupNorm of ``groups`` groups: per image) or ``batch`` (BatchNorm: per micro-batch).
        groups: GroupNorm groups (each stage's channels must be divisible by it).
        drop: dropout on the pooled embedding during training (0: off).
    """

    def __init__(
        self,
        image_size: int = 64,
        channels: Sequence[int] = (32, 64, 128, 128),
        in_chans: int = 3,
        norm: Literal["group", "batch"] = "group",
        groups: int = 8,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive counts, got {channels}")
        if norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch', got {norm!r}")
        if norm == "group" and any(c % groups for c in channels):
            raise ValueError(f"every stage's channels {channels} must be divisible by groups={groups}")
        stride = 2 ** len(channels)
        if image_size % stride:
            raise ValueError(f"image_size {image_size} is not divisible by 2**{len(channels)} = {stride}")
        self.image_size = image_size
        self.width = channels[-1]
        self.grid = image_size // stride
        stages: list[nn.Module] = []
        c_in = in_chans
        for c in channels:
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.GroupNorm(groups, c) if norm == "group" else nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ))  # fmt: skip
            c_in = c
        self.blocks = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.width)  # on the tokens a resampler reads
        self.drop = nn.Dropout(drop)

    def feature_map(self, images: Tensor) -> Tensor:
        """Images (b, c, h, w) -> the last stage's map (b, width, h / 2**stages, w / 2**stages)."""
        # Channels-last: the same values, about 1.4x faster convolutions on a CPU (oneDNN) and a GPU (cuDNN).
        x = images.contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_tokens(self, images: Tensor) -> Tensor:
        """Images (b, c, h, w) -> the last map's cells as tokens (b, cells, width), layer-normalised."""
        return self.norm(self.intermediate_tokens(images, 0))

    def intermediate_tokens(self, images: Tensor, skip_last_blocks: int) -> Tensor:
        """As :meth:`forward_tokens` without the final norm; earlier stages have other widths, so only
        ``skip_last_blocks=0`` is defined."""
        if skip_last_blocks != 0:
            raise ValueError("a ConvNet's earlier stages have other widths and grids: only the last (visual_layer -1) "
                             "can be read")
        return self.feature_map(images).flatten(2).transpose(1, 2)

    def forward(self, images: Tensor) -> Tensor:
        """Images (b, c, h, w) -> pooled embedding (b, width): the mean over the last map's cells."""
        return self.drop(self.feature_map(images).mean(dim=(2, 3)))

    def lock(self, unlocked_blocks: int = 0) -> list[nn.Module]:
        """Freezes the tower except its last ``unlocked_blocks`` stages and the token norm (LiT); returns the frozen
        modules (a task keeps them in eval mode)."""
        if unlocked_blocks < 0:
            raise ValueError(f"unlocked_blocks must be >= 0, got {unlocked_blocks}")
        if unlocked_blocks == 0:
            frozen: list[nn.Module] = [self]
        else:
            frozen = list(self.blocks[: len(self.blocks) - min(unlocked_blocks, len(self.blocks))])
        for module in frozen:
            module.requires_grad_(False)
        return frozen

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, width={self.width}, grid={self.grid}x{self.grid}"


__all__ = ["ConvNet"]
