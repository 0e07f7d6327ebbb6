"""Image transforms.

The evaluation path is CLIP's: resize the shorter side to ``image_size`` (bicubic, antialiased), centre crop,
scale to [0, 1], normalise. Training with ``augment=False`` is exactly that path. Augmentation is a mild random
resized crop, optionally with a random rotation (``rotation``: colours and left/right untouched, so captions that
name colours and sides stay true; digits and letters only within small angles); horizontal flips are off by default
because captions say "left of" / "right of" and a flip would make them false.

Both are split into a *geometry* part (PIL / uint8 tensor -> uint8 tensor of the final size) and a *normalise*
part (uint8 -> normalised float), so a data module can run the deterministic geometry once and cache its result.

The evaluation path calls torch directly (the same ``interpolate`` call, size rule, crop offsets and arithmetic as
torchvision ``transforms.v2``'s ``Resize``/``CenterCrop``/``ToDtype``/``Normalize``; tests/test_transforms.py checks
them bit for bit against torchvision): importing torchvision imports its detection models and ``torch._dynamo``,
seconds of start-up that classifying one image should not pay. Training transforms are torchvision's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torchvision.transforms import v2

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_uint8_tensor(image: Any) -> torch.Tensor:
    """A PIL image (its bands as channels) or a uint8 tensor (C, H, W) -> uint8 tensor (C, H, W)."""
    if isinstance(image, torch.Tensor):
        return image
    pixels = torch.from_numpy(np.array(image, copy=True))
    return pixels.view(image.size[1], image.size[0], -1).permute(2, 0, 1)


def resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """The shorter side of a uint8 (..., C, H, W) image to ``size``, the longer in proportion (rounded down), bicubic
    and antialiased on the uint8 pixels; unchanged when the shorter side is ``size`` already."""
    *lead, c, h, w = image.shape
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) == (h, w) or image.numel() == 0:
        return image
    out = F.interpolate(image.reshape(-1, c, h, w), size=[new_h, new_w], mode="bicubic", align_corners=False,
                        antialias=True)  # fmt: skip
    return out.reshape(*lead, c, new_h, new_w)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` of a (..., H, W) image, zero-padded first where a side is shorter."""
    h, w = image.shape[-2:]
    if size > h or size > w:
        left, top = max(size - w, 0) // 2, max(size - h, 0) // 2
        image = F.pad(image, [left, max(size - w + 1, 0) // 2, top, max(size - h + 1, 0) // 2], value=0.0)
        h, w = image.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[..., top : top + size, left : left + size]


class EvalGeometry:
    """PIL image or uint8 tensor -> uint8 image tensor (C, image_size, image_size): resize shorter side, crop."""

    def __init__(self, image_size: int) -> None:
        self.image_size = int(image_size)

    def __call__(self, image: Any) -> torch.Tensor:
        return center_crop(resize_shorter(to_uint8_tensor(image), self.image_size), self.image_size)


class Normalize:
    """uint8 image tensor (..., C, H, W) -> float32 in [0, 1] -> ``(x - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if not all(std):
            raise ValueError(f"std {list(std)} holds a zero")
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32) if image.is_floating_point() else image.to(torch.float32).mul_(1.0 / 255)
        return x.sub(self.mean.to(x.device)).div_(self.std.to(x.device))


class Compose:
    """Applies each transform in turn."""

    def __init__(self, *steps: Any) -> None:
        self.steps = steps

    def __call__(self, image: Any) -> Any:
        for step in self.steps:
            image = step(image)
        return image


def eval_geometry(image_size: int) -> EvalGeometry:
    """PIL image or uint8 tensor -> uint8 image tensor (3, image_size, image_size): resize shorter side, crop."""
    return EvalGeometry(image_size)


def normalize(mean: Sequence[float], std: Sequence[float]) -> Normalize:
    """uint8 image tensor -> float32 in [0, 1] -> ``(x - mean) / std``."""
    return Normalize(mean, std)


def eval_transform(
    image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> Compose:
    """The deterministic evaluation transform: PIL image -> normalised float tensor (3, image_size, image_size)."""
    return Compose(eval_geometry(image_size), normalize(mean, std))


def train_geometry(
    image_size: int,
    augment: bool = True,
    scale: tuple[float, float] = (0.8, 1.0),
    hflip: bool = False,
    rotation: float = 0.0,
) -> v2.Compose | EvalGeometry:
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
    from torchvision.transforms import v2

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
) -> Compose:
    """PIL image -> normalised float tensor; ``augment=False`` gives exactly :func:`eval_transform`."""
    return Compose(train_geometry(image_size, augment, scale, hflip, rotation), normalize(mean, std))


# Basic and common colour names: the words a recoloured view strikes from its caption (``RecolourView``).
COLOUR_WORDS = frozenset(
    "red orange yellow green teal blue purple pink violet magenta cyan turquoise brown black white grey gray "
    "gold golden silver beige maroon navy olive lime indigo crimson scarlet tan amber".split()
)


def strip_words(caption: str, words: frozenset[str] | set[str]) -> str:
    """``caption`` without ``words`` (case-insensitive, punctuation kept); an article before a word that now starts
    with another kind of sound is mended ("an orange cat" -> "a cat")."""
    kept = [w for w in caption.split() if w.lower().strip(".,;:!?") not in words]
    for i in range(len(kept) - 1):
        if kept[i].lower() in ("a", "an"):
            article = "an" if kept[i + 1][:1].lower() in "aeiou" else "a"
            kept[i] = article if kept[i].islower() else article.capitalize()
    return " ".join(kept)


class RecolourView:
    """A colour-free view of a training pair: the image's colours scrambled (a random permutation of its channels,
    then a random hue turn; greyscale with probability ``grey``) and the colour words struck from its caption, so
    the pair stays true. Trained on with probability ``p`` instead of the pair, it makes the image tower name what
    it sees in every colour: a shape never seen in red still reads as that shape when it is red.

    Args:
        p: probability that a training sample is replaced by its colour-free view.
        words: the colour words struck from captions (default :data:`COLOUR_WORDS`).
        grey: probability that the view is greyscale rather than hue-turned.
    """

    def __init__(self, p: float = 0.5, words: Sequence[str] | None = None, grey: float = 0.25) -> None:
        if not 0.0 <= p <= 1.0 or not 0.0 <= grey <= 1.0:
            raise ValueError(f"recolour probabilities must lie in [0, 1], got p={p}, grey={grey}")
        self.p, self.grey = float(p), float(grey)
        self.words = frozenset(w.lower() for w in words) if words is not None else COLOUR_WORDS

    def caption(self, caption: str) -> str:
        return strip_words(caption, self.words)

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> the same image with its colours scrambled."""
        from torchvision.transforms.v2 import functional as TF

        image = image[torch.randperm(3)]
        if torch.rand(()) < self.grey:
            return TF.rgb_to_grayscale(image, num_output_channels=3)
        return TF.adjust_hue(image, float(torch.rand(())) - 0.5)


__all__ = [
    "COLOUR_WORDS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Compose",
    "EvalGeometry",
    "Normalize",
    "RecolourView",
    "center_crop",
    "eval_geometry",
    "eval_transform",
    "normalize",
    "resize_shorter",
    "strip_words",
    "to_uint8_tensor",
    "train_geometry",
    "train_transform",
]
