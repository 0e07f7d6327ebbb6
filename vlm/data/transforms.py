"""Image transforms (torchvision ``transforms.v2``).

The evaluation path is CLIP's: resize the shorter side to ``image_size`` (bicubic, antialiased), centre crop,
scale to [0, 1], normalise. Training with ``augment=False`` is exactly that path. Augmentation is a mild random
resized crop; horizontal flips are off by default because captions say "left of" / "right of" and a flip would
make them false.

Both are split into a *geometry* part (PIL / uint8 tensor -> uint8 tensor of the final size) and a *normalise*
part (uint8 -> normalised float), so a data module can run the deterministic geometry once and cache its result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def eval_geometry(image_size: int) -> v2.Compose:
    """PIL image or uint8 tensor -> uint8 image tensor (3, image_size, image_size): resize shorter side, crop."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


def normalize(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """uint8 image tensor -> float32 in [0, 1] -> ``(x - mean) / std``."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def eval_transform(
    image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> v2.Compose:
    """The deterministic evaluation transform: PIL image -> normalised float tensor (3, image_size, image_size)."""
    return v2.Compose([eval_geometry(image_size), normalize(mean, std)])


def train_geometry(
    image_size: int, augment: bool = True, scale: tuple[float, float] = (0.8, 1.0), hflip: bool = False
) -> v2.Compose:
    """Training geometry; with ``augment=False`` it is :func:`eval_geometry`.

    Args:
        image_size: output side.
        augment: random resized crop (area ``scale``, aspect 3/4..4/3) instead of resize + centre crop.
        scale: area range of the random crop; kept close to 1 so "small" and "large" objects stay so.
        hflip: random horizontal flips. Off by default: they falsify "left of" / "right of" captions.
    """
    if not augment:
        return eval_geometry(image_size)
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            image_size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def train_transform(
    image_size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    augment: bool = True,
    scale: tuple[float, float] = (0.8, 1.0),
    hflip: bool = False,
) -> v2.Compose:
    """PIL image -> normalised float tensor; ``augment=False`` gives exactly :func:`eval_transform`."""
    return v2.Compose([train_geometry(image_size, augment, scale, hflip), normalize(mean, std)])


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "eval_geometry",
    "eval_transform",
    "normalize",
    "train_geometry",
    "train_transform",
]
