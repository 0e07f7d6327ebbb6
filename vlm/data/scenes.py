"""Two-object shapes scenes with object boxes and several captions per image: the evaluation set for attention
maps (does the map for "red circle" land on the red circle?) and for retrieval with several captions per image.

Each image holds two objects of different classes drawn from all 36 (held-out pairs included), laid out as in
the training scenes of :mod:`vlm.data.shapes` (same renderer, sizes, relations and backgrounds). Its
``metadata.jsonl`` row has ``file_name``, ``captions`` (five phrasings of the same scene: both orders of the
relation, with and without sizes, and "and") and ``objects``: ``label``, ``size`` and ``box`` ``[x0, y0, x1, y1]``
in pixels (the object's square bounding box).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vlm.data import shapes

_SCENES_SPLIT_CODE = 2  # the generators of shapes' train / validation use 0 / 1
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def two_object_scene(seed: int, index: int, image_size: int = 64) -> tuple[Image.Image, dict]:
    """One two-object scene and its metadata row (without ``file_name``); deterministic for ``(seed, index)``."""
    rng = np.random.default_rng([seed, _SCENES_SPLIT_CODE, index])
    first, second = rng.choice(len(shapes.CLASSNAMES), size=2, replace=False)
    sizes = list(shapes.SIZES)
    objects = []
    for k in (first, second):
        colour, shape = shapes.CLASSNAMES[k].split(" ")
        objects.append(shapes._object(rng, colour, shape, sizes[rng.integers(len(sizes))]))
    relation = shapes.RELATIONS[rng.integers(len(shapes.RELATIONS))]
    shapes._place_two(rng, objects[0], objects[1], relation, image_size)
    scene = shapes.Scene(objects, shapes._background(rng), relation)
    image = shapes.render(scene, image_size, rng)
    a, b = objects
    captions = [
        shapes.caption(scene),
        f"{b.phrase} {_INVERSE[relation]} {a.phrase}",
        f"{a.short_phrase} {relation} {b.short_phrase}",
        f"{b.short_phrase} {_INVERSE[relation]} {a.short_phrase}",
        f"{a.short_phrase} and {b.short_phrase}",
    ]
    boxes = []
    for obj in objects:
        half = shapes.SIZES[obj.size] * image_size / 2
        box = [obj.cx - half, obj.cy - half, obj.cx + half, obj.cy + half]
        boxes.append({"label": obj.label, "size": obj.size, "box": [round(v, 2) for v in box]})
    return image, {"captions": captions, "objects": boxes}


def generate_scenes(out: str | os.PathLike, count: int = 360, seed: int = 0, image_size: int = 64) -> Path:
    """Writes ``count`` two-object scenes into ``out`` (an imagefolder: PNGs + ``metadata.jsonl``, written last)."""
    if image_size < shapes.MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {shapes.MIN_IMAGE_SIZE}, got {image_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, row = two_object_scene(seed, i, image_size)
        name = f"{i:05d}.png"
        image.save(out / name)
        rows.append({"file_name": name, **row})
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "metadata.jsonl")
    return out


__all__ = ["generate_scenes", "two_object_scene"]
