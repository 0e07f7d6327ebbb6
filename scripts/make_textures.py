"""Writes an image-caption folder of photographed textures in colour: scikit-image's sample photos cut into patches.

    python scripts/make_textures.py --out data/textures

Unlike drawn shapes these are real photographs with no object and no edge to find: the material is a texture
(scikit-image's ``brick``, ``grass``, ``gravel`` and the cratered ``moon``, 512 px grey photographs shipped with the
package), the colour a duotone (the photograph's dark tones near black or white, its light tones the named colour).
Each image is a random square patch (96 to 224 px of the photograph, at most the part's height, turned by a multiple
of 90 degrees or mirrored, resized to 64 px); training patches come from the top 60% of each photograph, validation
patches from the bottom 40%, so no validation pixel was seen. Captions name colour and material in one of two frames
("a close-up of blue brick", "a photo of blue brick"); 5 of the 24 colour-material pairs never appear in training.

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
from PIL import Image

COLOURS = {
    "red": (225, 45, 45), "orange": (250, 150, 30), "yellow": (240, 225, 40), "green": (50, 185, 70),
    "blue": (50, 110, 235), "purple": (165, 80, 215),
}  # fmt: skip
MATERIALS = ("brick", "grass", "gravel", "moon")
HELDOUT = {("red", "grass"), ("orange", "gravel"), ("yellow", "moon"), ("green", "brick"), ("purple", "grass")}
FRAMES = ("a close-up of {}", "a photo of {}")
TRAIN_FRACTION = 0.6  # of each photograph's rows


def photographs() -> dict[str, np.ndarray]:
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in MATERIALS}


def render(rng: np.random.Generator, photo: np.ndarray, colour: str, image_size: int) -> Image.Image:
    h, w = photo.shape
    side = int(rng.integers(96, min(224, h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = np.rot90(photo[y : y + side, x : x + side], k=int(rng.integers(4)))
    if rng.integers(2):
        patch = patch[:, ::-1]
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((image_size,) * 2, Image.Resampling.LANCZOS))
    t = grey.astype(np.float32) / 255.0
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)  # full range in every patch: the colour, not the exposure
    dark = np.full(3, 255.0 if rng.integers(4) == 0 else 15.0)  # mostly dark-to-colour, sometimes light-to-colour
    jitter = rng.integers(-15, 16, size=3)
    light = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255)
    rgb = dark + t[..., None] * (light - dark)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def rows(
    photos: dict[str, np.ndarray], pairs: list[tuple[str, str]], count: int, rows_part: slice, seed: int
) -> Iterator[Row]:
    rng = np.random.default_rng(seed)
    for i in range(count):
        colour, material = pairs[i % len(pairs)]
        image = render(rng, photos[material][rows_part], colour, 64)
        label = f"{colour} {material}"
        frame = FRAMES[int(rng.integers(len(FRAMES)))]
        yield image, frame.format(label), label, (colour, material) in HELDOUT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/textures", help="output folder (default data/textures)")
    p.add_argument("--train", type=int, default=4000, help="training images (default 4,000)")
    p.add_argument("--val", type=int, default=960, help="validation images (default 960: 40 per pair)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    out = Path(args.out)
    if already_written(out):
        return 0
    photos = photographs()
    cut = int(512 * TRAIN_FRACTION)
    every = [(c, m) for c in COLOURS for m in MATERIALS]
    seen = [pr for pr in every if pr not in HELDOUT]
    write_split(out / "train", rows(photos, seen, args.train, slice(0, cut), args.seed))
    write_split(out / "validation", rows(photos, every, args.val, slice(cut, None), args.seed + 1))
    write_class_lists(out, every, HELDOUT)
    print(f"wrote {args.train} training and {args.val} validation images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
