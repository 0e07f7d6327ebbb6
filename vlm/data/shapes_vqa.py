"""Questions about the shapes scenes (visual question answering): colour, shape, size, count and position.

The scenes are those of :mod:`vlm.data.shapes` (same renderer, colours, shapes, sizes, relations and backgrounds),
one or two objects each, and each image gets ``questions_per_image`` questions of different kinds:

====================  =========================================================  ==========================
kind                  question                                                   answers
====================  =========================================================  ==========================
colour                what colour is the star?                                   red, green, ... (6)
shape                 what shape is the red object?                              circle, square, ... (6)
size                  what size is the red star?                                 small, large
count                 how many shapes are there? / how many red shapes are        0, 1, 2
                      there?
position              where is the red star relative to the blue circle? /       left, right, above, below /
                      is the red star on the left or on the right? (or "at the    left, right, top, bottom
                      top or at the bottom?")
====================  =========================================================  ==========================

An object is named so that it is the only one fitting the words and the words never give the answer away ("what
colour is the star?" only when one star is in the image, "the small star" or another question kind otherwise). As
for the captions, the six held-out colour-shape pairs (:data:`vlm.data.shapes.HELD_OUT`) never appear in training,
neither in an image nor in a question; validation images start with each of the 36 classes in turn (their second
object, if any, is any other class), and a row's ``heldout`` is true when its image shows a held-out pair.

Layout: ``out/train/`` and ``out/validation/`` with the PNGs and ``metadata.jsonl``, one row per question
(``file_name``, ``question``, ``answer``, ``kind``, ``heldout``; written last), ``out/classnames.txt``,
``out/heldout.txt`` and ``out/info.json``. Deterministic for a seed: image i of a split draws from its own generator.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vlm.data import shapes
from vlm.data.shapes import ShapeObject

KINDS = ("colour", "shape", "size", "count", "position")
_SPLIT_CODES = {"train": 3, "validation": 4}  # shapes' splits use 0 / 1 and the scenes 2: other images
_TWO_OBJECT_PROB = 0.5
_CLEAR_OFFSET = 0.1  # an object this far (share of the side) from the centre is clearly left / right / top / bottom


def _scene(split: str, seed: int, index: int, image_size: int) -> tuple[shapes.Scene, np.random.Generator]:
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    if split == "train":  # never a held-out pair
        return shapes.sample_train_scene(rng, image_size, _TWO_OBJECT_PROB), rng
    sizes = list(shapes.SIZES)
    first = index % len(shapes.CLASSNAMES)  # every class in turn, held-out ones included
    classes = [first]
    if rng.random() < _TWO_OBJECT_PROB:
        classes.append(int(rng.choice([k for k in range(len(shapes.CLASSNAMES)) if k != first])))
    objects = []
    for k in classes:
        colour, shape = shapes.CLASSNAMES[k].split(" ")
        objects.append(shapes._object(rng, colour, shape, sizes[rng.integers(len(sizes))]))
    relation = None
    if len(objects) == 1:
        shapes._place_one(rng, objects[0], image_size)
    else:
        relation = shapes.RELATIONS[rng.integers(len(shapes.RELATIONS))]
        shapes._place_two(rng, objects[0], objects[1], relation, image_size)
    return shapes.Scene(objects, shapes._background(rng), relation), rng


def _name(obj: ShapeObject, objects: list[ShapeObject], forms: tuple[str, ...]) -> str | None:
    """The first of ``forms`` (words of ``obj``: "{shape}", "{colour} shape"...) that fits no other object, or None."""
    def words(o: ShapeObject, form: str) -> str:
        return form.format(colour=o.colour, shape=o.shape, size=o.size)

    for form in forms:
        if not any(o is not obj and words(o, form) == words(obj, form) for o in objects):
            return f"the {words(obj, form)}"
    return None


def _question(kind: str, scene: shapes.Scene, rng: np.random.Generator, image_size: int) -> tuple[str, str] | None:
    """A (question, answer) of ``kind`` about ``scene``, or None where the scene has no unambiguous one."""
    objects = scene.objects
    obj = objects[rng.integers(len(objects))]
    if kind == "colour":
        name = _name(obj, objects, ("{shape}", "{size} {shape}"))
        return (f"what colour is {name}?", obj.colour) if name else None
    if kind == "shape":
        name = _name(obj, objects, ("{colour} object", "{size} {colour} object"))
        return (f"what shape is {name}?", obj.shape) if name else None
    if kind == "size":
        name = _name(obj, objects, ("{colour} {shape}",))
        return (f"what size is {name}?", obj.size) if name else None
    if kind == "count":
        if rng.random() < 0.5:
            return "how many shapes are there?", str(len(objects))
        # a colour of the image or any colour (zero is an answer too)
        colour = obj.colour if rng.random() < 0.5 else list(shapes.COLOURS)[rng.integers(len(shapes.COLOURS))]
        return f"how many {colour} shapes are there?", str(sum(o.colour == colour for o in objects))
    name = _name(obj, objects, ("{colour} {shape}", "{size} {colour} {shape}"))
    if name is None:
        return None
    if len(objects) == 2:
        other = objects[1] if obj is objects[0] else objects[0]
        other_name = _name(other, objects, ("{colour} {shape}", "{size} {colour} {shape}"))
        if other_name is None:
            return None
        return f"where is {name} relative to {other_name}?", shapes._relation(obj, other).split(" ")[0]
    dx, dy = (obj.cx - image_size / 2) / image_size, (obj.cy - image_size / 2) / image_size
    if max(abs(dx), abs(dy)) < _CLEAR_OFFSET:
        return None
    if abs(dx) >= abs(dy):
        return f"is {name} on the left or on the right?", "left" if dx < 0 else "right"
    return f"is {name} at the top or at the bottom?", "top" if dy < 0 else "bottom"


def make_questions(split: str, seed: int, index: int, image_size: int = 64,
                   questions_per_image: int = 3) -> tuple[Image.Image, list[dict]]:
    """Image ``index`` of ``split`` and its question rows (without ``file_name``), each of another kind."""
    scene, rng = _scene(split, seed, index, image_size)
    image = shapes.render(scene, image_size, rng)
    ask = np.random.default_rng([seed, _SPLIT_CODES[split], index, 1])  # the questions do not change the image
    heldout = any((o.colour, o.shape) in shapes.HELD_OUT for o in scene.objects)
    rows = []
    for kind in ask.permutation(KINDS):
        qa = _question(str(kind), scene, ask, image_size)
        if qa is not None:
            rows.append({"question": qa[0], "answer": qa[1], "kind": str(kind), "heldout": heldout})
        if len(rows) == questions_per_image:
            break
    return image, rows


def generate_shapes_vqa(out: str | os.PathLike, train: int = 4000, val: int = 360, seed: int = 0,
                        image_size: int = 64, questions_per_image: int = 3) -> Path:
    """Writes the shapes questions into ``out`` (see the module docstring for the layout).

    Args:
        out: output directory (created).
        train: training images.
        val: validation images (a multiple of 36 starts every class equally often).
        seed: the same seed gives the same images and questions.
        image_size: side of the images in pixels (at least :data:`vlm.data.shapes.MIN_IMAGE_SIZE`).
        questions_per_image: questions per image, each of another kind (1 to 5; fewer where a scene has no
            unambiguous question of a kind).
    """
    if image_size < shapes.MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {shapes.MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= questions_per_image <= len(KINDS):
        raise ValueError(f"questions_per_image must be 1 to {len(KINDS)}, got {questions_per_image}")
    out = Path(out)
    for split, count in (("train", train), ("validation", val)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            image, rows = make_questions(split, seed, i, image_size, questions_per_image)
            name = f"{i:05d}.png"
            image.save(folder / name, compress_level=0)  # as vlm.data.shapes: noise barely compresses
            lines += [json.dumps({"file_name": name, **row}) + "\n" for row in rows]
        tmp = folder / "metadata.jsonl.tmp"
        tmp.write_text("".join(lines))
        tmp.replace(folder / "metadata.jsonl")
    (out / "classnames.txt").write_text("\n".join(shapes.CLASSNAMES) + "\n")
    (out / "heldout.txt").write_text("\n".join(shapes.HELD_OUT_CLASSNAMES) + "\n")
    info = {"seed": seed, "train": train, "validation": val, "image_size": image_size,
            "questions_per_image": questions_per_image, "kinds": list(KINDS), "sizes": shapes.SIZES,
            "heldout": list(shapes.HELD_OUT_CLASSNAMES)}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def check_generated_with(out: str | os.PathLike, seed: int, questions_per_image: int, image_size: int) -> None:
    """Raises :class:`~vlm.data.shapes.StaleDataError` naming each setting if ``out`` was generated with another
    seed, question count, image size or object sizes (settings ``out/info.json`` does not record are not checked)."""
    info_path = Path(out) / "info.json"
    if not info_path.is_file():
        return
    info = json.loads(info_path.read_text())
    wanted = dict(seed=seed, questions_per_image=questions_per_image, image_size=image_size, sizes=shapes.SIZES)
    wrong = [f"{k}={info[k]} (config: {v})" for k, v in wanted.items() if k in info and info[k] != v]
    if wrong:
        raise shapes.StaleDataError(f"{out} was generated with {', '.join(wrong)}; point data_dir at another folder "
                                    "(it is generated there on first use) or delete this one to regenerate it")


__all__ = ["KINDS", "check_generated_with", "generate_shapes_vqa", "make_questions"]
