"""Image transforms (torchvision ``transforms.v2``).

The evaluation path is CLIP's: resize the shorter side to ``image_size`` (bicubic, antialiased), centre crop,
scale to [0, 1], normalise. Training with ``augment=False`` is exactly that path. Augmentation is a mild random
resized crop, optionally with a random rotation (``rotation``: colours and left/right untouched, so captions that
name colours and sides stay true; digits and letters only within small angles); horizontal flips are off by default
because captions say "left of" / "right of" and a flip would make them false.

Both are split into a *geometry* part (PIL / uint8 tensor -> uint8 tensor of the final size) and a *normalise*
part (uint8 -> normalised float), so a data module can run the deterministic geometry once and cache its result.
"""

from __future__ import annotations

import math
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
    image_size: int,
    augment: bool = True,
    scale: tuple[float, float] = (0.8, 1.0),
    hflip: bool = False,
    rotation: float = 0.0,
) -> v2.Compose:
    """Training geometry; with ``augment=False`` it is :func:`eval_geometry`.

    Args:
        image_size: output side.
        augment: random resized crop (area ``scale``, aspect 3/4..4/3) instead of resize + centre crop.
        scale: area range of the random crop; kept close to 1 so "small" and "large" objects stay so.
        hflip: random horizontal flips. Off by default: they falsify "left of" / "right of" captions.
        rotation: rotate by a random angle in ``[-rotation, rotation]`` degrees after the crop (0: off). The image is
            first padded by reflection and centre-cropped back after the rotation, so the corners hold image
            content rather than black wedges a model could learn from. Colours are untouched; keep it small (about
            15) where a half turn changes the meaning (6 and 9).
    """
    if not augment:
        return eval_geometry(image_size)
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            image_size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        ),
    ]
    if rotation:
        # A square turned by up to 45 degrees needs its side times (cos + sin - 1) / 2 more on each side.
        turn = math.radians(min(abs(rotation), 45.0))
        pad = math.ceil(image_size * (math.cos(turn) + math.sin(turn) - 1) / 2) + 1
        steps += [
            v2.Pad(pad, padding_mode="reflect"),
            v2.RandomRotation(abs(rotation), interpolation=v2.InterpolationMode.BILINEAR),
            v2.CenterCrop(image_size),
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
    rotation: float = 0.0,
) -> v2.Compose:
    """PIL image -> normalised float tensor; ``augment=False`` gives exactly :func:`eval_transform`."""
    return v2.Compose([train_geometry(image_size, augment, scale, hflip, rotation), normalize(mean, std)])


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "eval_geometry",
    "eval_transform",
    "normalize",
    "train_geometry",
    "train_transform",
]
