"""Writes an image-caption folder drawn by a renderer of its own, to measure the own-data configs on.

    python scripts/make_polygons.py --out data/polygons

The images are unlike the built-in shapes data on purpose: anti-aliased (drawn at 4x and downsampled), rotated,
of varied sizes and positions, on varied backgrounds (flat, two-colour gradients, noise). Each holds one object of
one of 8 colours x 3 shapes; a caption names its size, colour and shape ("a large teal triangle"). A quarter of the
colour-shape pairs (6 of 24) never appear in training: they measure whether a model composes colour and shape or
only remembers the pairs it saw.

Output, in the layout the ``imagefolder`` configs read:

- ``train/`` and ``validation/``: PNG files and a ``metadata.jsonl`` (``file_name``, ``caption``, ``label``,
  ``heldout``);
- ``classnames.txt`` (the 24 "colour shape" labels) and ``heldout.txt`` (the 6 held-out ones).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from folder_writer import Row, already_written, write_class_lists, write_split
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (238, 210, 2), "green": (44, 160, 44),
    "teal": (23, 190, 207), "blue": (31, 90, 200), "purple": (148, 103, 189), "pink": (247, 129, 191),
}  # fmt: skip
SHAPES = ("triangle", "square", "circle")
# Six held-out pairs: every colour and every shape still appears in training with some other partner.
HELDOUT = {("red", "square"), ("orange", "circle"), ("yellow", "triangle"), ("teal", "square"),
           ("purple", "circle"), ("pink", "triangle")}  # fmt: skip
SCALE = 4  # supersampling factor: edges are anti-aliased by the downsampling


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """A flat colour, a two-colour gradient at a random angle, or smoothed noise; always light or dark enough
    that the 8 object colours stay visible (greys only)."""
    kind = rng.integers(3)
    level = rng.integers(20, 236)
    if kind == 0:
        return Image.new("RGB", (size, size), (int(level),) * 3)
    if kind == 1:
        a, b = rng.integers(30, 226, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = (xx * math.cos(angle) + yy * math.sin(angle) + 1.5) / 3
        grey = (a + (b - a) * t).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1))
    noise = rng.normal(level, 25, size=(size // 8 + 1, size // 8 + 1)).clip(0, 255).astype(np.uint8)
    grey = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)
    return Image.merge("RGB", [grey] * 3).filter(ImageFilter.GaussianBlur(2))


def polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if shape == "circle":  # a circle is a 48-gon: smooth once downsampled
        sides, offset = 48, 0.0
    else:
        sides, offset = (3, -math.pi / 2) if shape == "triangle" else (4, math.pi / 4)
    return [(cx + radius * math.cos(offset + angle + 2 * math.pi * i / sides),
             cy + radius * math.sin(offset + angle + 2 * math.pi * i / sides)) for i in range(sides)]  # fmt: skip


def render(rng: np.random.Generator, colour: str, shape: str, image_size: int) -> tuple[Image.Image, str]:
    """One image and its size word ("small" / "large")."""
    big = image_size * SCALE
    canvas = background(rng, big)
    large = bool(rng.integers(2))
    radius = big * (rng.uniform(0.28, 0.38) if large else rng.uniform(0.12, 0.19))
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, big - margin, size=2)
    jitter = rng.integers(-18, 19, size=3)  # the same colour name covers nearby shades
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    ImageDraw.Draw(canvas).polygon(polygon(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi)), fill=fill)
    image = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return image, "large" if large else "small"


def rows(pairs: list[tuple[str, str]], count: int, image_size: int, seed: int) -> Iterator[Row]:
    rng = np.random.default_rng(seed)
    for i in range(count):
        colour, shape = pairs[i % len(pairs)]
        image, size = render(rng, colour, shape, image_size)
        yield image, f"a {size} {colour} {shape}", f"{colour} {shape}", (colour, shape) in HELDOUT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/polygons", help="output folder (default data/polygons)")
    p.add_argument("--train", type=int, default=4000, help="training images (default 4,000)")
    p.add_argument("--val", type=int, default=960, help="validation images (default 960: 40 per pair)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    out = Path(args.out)
    if already_written(out):
        return 0
    every = [(c, s) for c in COLOURS for s in SHAPES]
    write_split(out / "train", rows([pr for pr in every if pr not in HELDOUT], args.train, args.image_size, args.seed))
    write_split(out / "validation", rows(every, args.val, args.image_size, args.seed + 1))
    write_class_lists(out, every, HELDOUT)
    print(f"wrote {args.train} training and {args.val} validation images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
