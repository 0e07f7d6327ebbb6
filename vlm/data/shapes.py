"""Synthetic compositional shapes: coloured shapes on noisy grey backgrounds, with captions and class labels.

Every image shows one or two objects. An object has a colour (6), a shape (6), a size (2) and a position; a
two-object caption also names the spatial relation between them ("a small red circle left of a large blue
square"). Six colour-shape pairs (:data:`HELD_OUT`) never appear in training, in either object slot, and make up
one sixth of validation, so zero-shot accuracy on them measures whether the model composes "red" and "triangle"
rather than memorising "red triangle".

The data is deterministic for a seed: each image draws from its own random generator, seeded from
``(seed, split, index)``, so images can be generated in any order by any number of processes.

To change the scene distribution (more objects, other relations, caption variants), edit :func:`sample_train_scene`
/ :func:`sample_val_scene` and :func:`caption`; rendering (:func:`render`) only reads a :class:`Scene`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Clearly distinct saturated colours; a grey background (R = G = B) can never be mistaken for any of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 175, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 35),
    "purple": (145, 55, 200),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
# Side of an object's bounding box as a fraction of the image side: at 0.3 (19 px of 64) a small circle and a small
# square, or a small cross and a small diamond, differ by enough pixels to be told apart.
SIZES: dict[str, float] = {"small": 0.3, "large": 0.45}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MIN_IMAGE_SIZE = 32  # two large objects plus margins must fit side by side

# The (colour, shape) pairs never seen in training: a Latin-square diagonal, so every colour and every shape is
# held out exactly once and is still seen in training with the five other shapes / colours.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "circle"),
    ("yellow", "cross"),
    ("purple", "square"),
    ("orange", "diamond"),
)
# All 36 classes in a fixed order (colour-major): the lines of classnames.txt.
CLASSNAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
HELD_OUT_CLASSNAMES: tuple[str, ...] = tuple(f"{c} {s}" for c, s in HELD_OUT)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)

_SPLIT_CODES = {"train": 0, "validation": 1}
_COLOUR_JITTER = 15  # per-channel variation of an object's colour, so colours are ranges, not single values
_NOISE_STD = 10.0  # gaussian pixel noise of the background
_SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down: smooth edges at little cost


@dataclass
class ShapeObject:
    """One object of a scene: attributes plus the centre of its bounding box in pixels."""

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    rgb: tuple[int, int, int]

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def short_phrase(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass
class Scene:
    """Everything needed to render an image and write its caption."""

    objects: list[ShapeObject]
    background: tuple[int, int, int]
    relation: str | None = None  # relation of objects[0] to objects[1] when there are two
    extra: dict = field(default_factory=dict)


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of generation order and process."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def _object(rng: np.random.Generator, colour: str, shape: str, size: str) -> ShapeObject:
    base = np.array(COLOURS[colour])
    rgb = np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255)
    return ShapeObject(colour, shape, size, 0.0, 0.0, tuple(int(v) for v in rgb))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    # Dark or light grey with a faint tint, far from every saturated shape colour.
    tone = int(rng.integers(25, 80)) if rng.random() < 0.5 else int(rng.integers(165, 225))
    return tuple(int(np.clip(tone + t, 0, 255)) for t in rng.integers(-6, 7, 3))


def _half(obj: ShapeObject, image_size: int) -> float:
    return SIZES[obj.size] * image_size / 2


def _place_one(rng: np.random.Generator, obj: ShapeObject, image_size: int) -> None:
    h = _half(obj, image_size)
    obj.cx, obj.cy = (float(v) for v in rng.uniform(h + 1, image_size - h - 1, 2))


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Relation of ``a`` to ``b`` along the dominant axis (image y grows downwards)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _place_two(rng: np.random.Generator, a: ShapeObject, b: ShapeObject, relation: str, image_size: int) -> None:
    """Places two non-overlapping objects so that ``a`` is ``relation`` ``b``, unambiguously.

    Along the relation's axis the objects' boxes are laid out with random margins (uniform over the free space);
    across it, each centre is random but the offset stays under 2/3 of the main one, so the dominant axis is
    clear ("left of" never looks like "above").
    """
    ha, hb = _half(a, image_size), _half(b, image_size)
    slack = image_size - 2 - 2 * (ha + hb) - 1
    if slack < 0:
        raise ValueError(f"a {a.size} and a {b.size} object do not fit side by side in {image_size} px")
    first, second = (a, b) if relation in ("left of", "above") else (b, a)  # first = left / top object
    h1, h2 = _half(first, image_size), _half(second, image_size)
    u1, u2 = np.sort(rng.uniform(0, slack, 2))
    c1 = 1 + u1 + h1
    c2 = c1 + h1 + 1 + (u2 - u1) + h2
    main = c2 - c1
    for _ in range(100):
        o1 = rng.uniform(h1 + 1, image_size - h1 - 1)
        o2 = rng.uniform(h2 + 1, image_size - h2 - 1)
        if abs(o1 - o2) * 1.5 <= main:
            break
    else:
        o2 = float(np.clip(o1, h2 + 1, image_size - h2 - 1))
    horizontal = relation in ("left of", "right of")
    for obj, along, across in ((first, c1, o1), (second, c2, o2)):
        obj.cx, obj.cy = (float(along), float(across)) if horizontal else (float(across), float(along))


def sample_train_scene(rng: np.random.Generator, image_size: int, two_object_prob: float = 0.5) -> Scene:
    """A training scene: one or two objects, never a held-out colour-shape pair."""
    n = 2 if rng.random() < two_object_prob else 1
    objects = []
    for _ in range(n):
        colour, shape = TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
        objects.append(_object(rng, colour, shape, list(SIZES)[rng.integers(len(SIZES))]))
    relation = None
    if n == 1:
        _place_one(rng, objects[0], image_size)
    else:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        _place_two(rng, objects[0], objects[1], relation, image_size)
    return Scene(objects, _background(rng), relation)


def sample_val_scene(rng: np.random.Generator, index: int, image_size: int) -> Scene:
    """A validation scene: one object whose class cycles through all 36 classes (held-out ones included)."""
    colour, shape = CLASSNAMES[index % len(CLASSNAMES)].split(" ")
    obj = _object(rng, colour, shape, list(SIZES)[rng.integers(len(SIZES))])
    _place_one(rng, obj, image_size)
    return Scene([obj], _background(rng))


def caption(scene: Scene, with_size: Sequence[bool] | None = None) -> str:
    """``a {size} {colour} {shape}`` [``{relation} a {size} {colour} {shape}``].

    ``with_size[i]`` False leaves out object i's size word: training captions that mention each attribute
    independently teach the text tower that "a red circle" describes small and large red circles alike, which is
    the prompt zero-shot classification asks about.
    """
    flags = list(with_size) if with_size is not None else [True] * len(scene.objects)
    phrases = [o.phrase if keep else o.short_phrase for o, keep in zip(scene.objects, flags)]
    if len(phrases) == 1:
        return phrases[0]
    return f"{phrases[0]} {scene.relation} {phrases[1]}"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape inscribed in the box of half-side r around (cx, cy)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r / 3  # half the arm thickness
        pts = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r), (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t),
               (-t, r)]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "star":
        # Five points, the first pointing up; inner radius 0.45 keeps the arms thick enough to see at 32 px.
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + float(q * np.cos(a)), cy + float(q * np.sin(a))) for q, a in zip(radii, angles)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draws the scene: noisy background, then the objects with smooth edges."""
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), scene.background)
    mask = Image.new("L", (big, big), 0)
    draw, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    for obj in scene.objects:
        cx, cy = obj.cx * _SUPERSAMPLE, obj.cy * _SUPERSAMPLE
        r = _half(obj, image_size) * _SUPERSAMPLE
        if obj.shape == "circle":
            box = [cx - r, cy - r, cx + r, cy + r]
            draw.ellipse(box, fill=obj.rgb)
            draw_mask.ellipse(box, fill=255)
        else:
            pts = _polygon(obj.shape, cx, cy, r)
            draw.polygon(pts, fill=obj.rgb)
            draw_mask.polygon(pts, fill=255)
    pixels = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)
    coverage = np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32)[..., None] / 255.0
    # Noise on the background only: the objects keep their (jittered) colour. (In place: this is the hot loop.)
    noisy = rng.standard_normal(pixels.shape, dtype=np.float32)
    noisy *= _NOISE_STD * (1.0 - coverage)
    noisy += pixels
    np.clip(np.rint(noisy, out=noisy), 0, 255, out=noisy)
    return Image.fromarray(noisy.astype(np.uint8))


def make_sample(
    seed: int,
    split: str,
    index: int,
    image_size: int = 64,
    two_object_prob: float = 0.5,
    size_mention_prob: float = 1.0,
) -> tuple[Image.Image, dict]:
    """One image and its metadata row (without ``file_name``).

    ``caption`` mentions each training object's size with probability ``size_mention_prob``; ``full_caption``
    always does (validation captions are always full: they are the references for captioning).
    """
    rng = rng_for(seed, split, index)
    if split == "train":
        scene = sample_train_scene(rng, image_size, two_object_prob)
    else:
        scene = sample_val_scene(rng, index, image_size)
    image = render(scene, image_size, rng)
    first = scene.objects[0]
    with_size = None
    if split == "train":
        # A generator of its own, so the images do not depend on this choice.
        pick = np.random.default_rng([seed, _SPLIT_CODES[split], index, 1])
        with_size = [bool(pick.random() < size_mention_prob) for _ in scene.objects]
    row = {
        "caption": caption(scene, with_size),
        "full_caption": caption(scene),
        "label": first.label,
        "colour": first.colour,
        "shape": first.shape,
        "size": first.size,
        "num_objects": len(scene.objects),
        "heldout": any((o.colour, o.shape) in HELD_OUT for o in scene.objects),
    }
    return image, row


def _write_one(job: tuple[str, int, str, int, int, float, float]) -> dict:
    folder, seed, split, index, image_size, two_object_prob, size_mention_prob = job
    image, row = make_sample(seed, split, index, image_size, two_object_prob, size_mention_prob)
    name = f"{index:05d}.png"
    # Stored uncompressed: noisy backgrounds barely compress (the files take the same 4 KiB disk blocks either
    # way), and uncompressed PNGs encode and decode about twice as fast.
    image.save(os.path.join(folder, name), compress_level=0)
    return {"file_name": name, **row}


def generate_shapes(
    out: str | os.PathLike,
    train: int = 20000,
    val: int = 1800,
    seed: int = 0,
    image_size: int = 64,
    processes: int | None = None,
    two_object_prob: float = 0.25,
    size_mention_prob: float = 0.5,
) -> Path:
    """Writes the shapes dataset as a Hugging Face ``imagefolder``.

    Layout: ``out/train/`` and ``out/validation/`` with ``00000.png``... and ``metadata.jsonl`` (``file_name``,
    ``caption``, ``label``, ``colour``, ``shape``, ``size``, ``num_objects``, ``heldout``); ``out/classnames.txt``
    (the 36 classes), ``out/heldout.txt`` (the 6 held-out classes) and ``out/info.json``. ``metadata.jsonl`` is
    written last, so a folder that has it is complete.

    Args:
        out: output directory (created).
        train: number of training images.
        val: number of validation images (a multiple of 36 gives every class equally often).
        seed: the same seed gives byte-identical images.
        image_size: side of the square images in pixels (at least :data:`MIN_IMAGE_SIZE`).
        processes: worker processes (default: all CPUs).
        two_object_prob: fraction of training scenes with two objects (the rest have one).
        size_mention_prob: chance that a training caption names an object's size (``full_caption`` always does).
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} (two large shapes side by side), "
                         f"got {image_size}")
    out = Path(out)
    processes = processes or os.cpu_count() or 1
    ctx = get_context("fork") if "fork" in _start_methods() else get_context()
    for split, count in (("train", train), ("validation", val)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(str(folder), seed, split, i, image_size, two_object_prob, size_mention_prob) for i in range(count)]
        if processes > 1 and count >= 256:
            with ctx.Pool(processes) as pool:
                rows = pool.map(_write_one, jobs, chunksize=256)
        else:
            rows = [_write_one(job) for job in jobs]
        tmp = folder / "metadata.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(folder / "metadata.jsonl")
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out / "heldout.txt").write_text("\n".join(HELD_OUT_CLASSNAMES) + "\n")
    info = {
        "seed": seed,
        "two_object_prob": two_object_prob,
        "size_mention_prob": size_mention_prob,
        "train": train,
        "validation": val,
        "image_size": image_size,
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "sizes": SIZES,
        "heldout": list(HELD_OUT_CLASSNAMES),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def is_complete(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a finished dataset (both splits' metadata and the class files)."""
    out = Path(out)
    needed = [out / "train" / "metadata.jsonl", out / "validation" / "metadata.jsonl", out / "classnames.txt"]
    return all(p.is_file() for p in needed)


class StaleDataError(ValueError):
    """An existing dataset folder was generated with other settings than the ones asked for."""


def check_generated_with(out: str | os.PathLike, seed: int, two_object_prob: float, size_mention_prob: float) -> None:
    """Raises :class:`StaleDataError`, naming each setting, if the dataset in ``out`` was generated with another
    seed, two-object share, size-mention share or other object :data:`SIZES` than asked for (settings that
    ``out/info.json`` does not record are not checked)."""
    info_path = Path(out) / "info.json"
    if not info_path.is_file():
        return
    info = json.loads(info_path.read_text())
    wanted = dict(seed=seed, two_object_prob=two_object_prob, size_mention_prob=size_mention_prob, sizes=SIZES)
    wrong = [f"{k}={info[k]} (config: {v})" for k, v in wanted.items() if k in info and info[k] != v]
    if wrong:
        raise StaleDataError(f"{out} was generated with {', '.join(wrong)}; point data_dir at another folder (it is "
                             "generated there on first use) or delete this one to regenerate it")


def _start_methods() -> list[str]:
    from multiprocessing import get_all_start_methods

    return get_all_start_methods()


__all__ = [
    "CLASSNAMES",
    "COLOURS",
    "HELD_OUT",
    "HELD_OUT_CLASSNAMES",
    "MIN_IMAGE_SIZE",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "ShapeObject",
    "StaleDataError",
    "caption",
    "check_generated_with",
    "generate_shapes",
    "is_complete",
    "make_sample",
    "render",
    "sample_train_scene",
    "sample_val_scene",
]
