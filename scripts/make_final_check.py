"""Writes the final-check image-caption folder: shapes, colours and a renderer that no recipe was tuned on.

    python scripts/make_final_check.py --out data/final-check

Kept apart from the datasets the own-data recipe was measured on while it was chosen: it is run once, with the
recipe as shipped, to check that the recipe was not fitted to those. 6 colours (brown, cyan, magenta, lime, navy,
gold) x 4 shapes (star, cross, hexagon, diamond), each drawn filled or as a thick outline (not said in the caption),
rotated, 14 to 28 px in radius, on a pale tinted background with a few faint lines; 64 px, anti-aliased (drawn at 4x).
Captions: "a drawing of a cyan star". 5 of the 24 pairs never appear in training.

Output, in the layout the ``imagefolder`` configs read: ``train/`` and ``validation/`` (PNG files and a
``metadata.jsonl`` with ``file_name``, ``caption``, ``label``, ``heldout``), ``classnames.txt``, ``heldout.txt``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from folder_writer import Row, already_written, write_class_lists, write_split
from PIL import Image, ImageDraw

COLOURS = {
    "brown": (140, 80, 30), "cyan": (20, 200, 220), "magenta": (215, 30, 190), "lime": (140, 225, 30),
    "navy": (20, 30, 120), "gold": (225, 175, 20),
}  # fmt: skip
SHAPES = ("star", "cross", "hexagon", "diamond")
HELDOUT = {("brown", "cross"), ("cyan", "hexagon"), ("magenta", "diamond"), ("lime", "star"), ("gold", "cross")}
SCALE = 4


def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "star":
        radii, n = [r if i % 2 == 0 else 0.45 * r for i in range(10)], 10
    elif shape == "hexagon":
        radii, n = [r] * 6, 6
    elif shape == "diamond":
        return [(cx + dx * math.cos(angle) - dy * math.sin(angle), cy + dx * math.sin(angle) + dy * math.cos(angle))
                for dx, dy in ((0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0))]  # fmt: skip
    else:  # a plus sign: 12 corners
        a = 0.33 * r
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
               (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]  # fmt: skip
        return [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                for x, y in pts]  # fmt: skip
    turns = [angle + 2 * math.pi * i / n for i in range(n)]
    return [(cx + radii[i] * math.cos(t), cy + radii[i] * math.sin(t)) for i, t in enumerate(turns)]


def render(rng: np.random.Generator, colour: str, shape: str, image_size: int) -> Image.Image:
    big = image_size * SCALE
    tint = rng.integers(200, 256, size=3)
    canvas = Image.new("RGB", (big, big), tuple(int(v) for v in tint))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):  # faint distractor lines
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, big, size=4))
        shade = tuple(int(v) for v in (tint * rng.uniform(0.75, 0.9)).astype(int))
        draw.line([(x0, y0), (x1, y1)], fill=shade, width=SCALE * 2)
    r = rng.uniform(14, 28) * SCALE
    cx, cy = rng.uniform(r * 1.05, big - r * 1.05, size=2)
    jitter = rng.integers(-15, 16, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    points = outline(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
    if rng.integers(2):
        draw.polygon(points, fill=fill)
    else:
        draw.line(points + points[:1], fill=fill, width=SCALE * 3, joint="curve")
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def rows(pairs: list[tuple[str, str]], count: int, seed: int) -> Iterator[Row]:
    rng = np.random.default_rng(seed)
    for i in range(count):
        colour, shape = pairs[i % len(pairs)]
        image = render(rng, colour, shape, 64)
        yield image, f"a drawing of a {colour} {shape}", f"{colour} {shape}", (colour, shape) in HELDOUT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/final-check", help="output folder (default data/final-check)")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=960)
    p.add_argument("--seed", type=int, default=4321)
    args = p.parse_args(argv)
    out = Path(args.out)
    if already_written(out):
        return 0
    every = [(c, s) for c in COLOURS for s in SHAPES]
    write_split(out / "train", rows([pr for pr in every if pr not in HELDOUT], args.train, args.seed))
    write_split(out / "validation", rows(every, args.val, args.seed + 1))
    write_class_lists(out, every, HELDOUT)
    print(f"wrote {args.train} training and {args.val} validation images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
