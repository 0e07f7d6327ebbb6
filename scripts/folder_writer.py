"""What the dataset generators in ``scripts/`` share: writing an image-caption folder in the layout the
``imagefolder`` configs read.

``<out>/train/`` and ``<out>/validation/`` hold PNG files and a ``metadata.jsonl`` (``file_name``, ``caption``,
``label``, ``heldout``); ``<out>/classnames.txt`` lists every label, ``<out>/heldout.txt`` the ones training never
shows. Imported by the generators (``python scripts/make_*.py`` puts this folder on the path).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

Row = tuple[Image.Image, str, str, bool]  # image, caption, label, held out


def already_written(out: Path) -> bool:
    """True (and says so) when ``out`` holds a written folder: generators never overwrite one."""
    if (out / "train" / "metadata.jsonl").exists():
        print(f"{out} exists: delete it to write it again", file=sys.stderr)
        return True
    return False


def write_split(out: Path, rows: Iterable[Row], shuffle: np.random.Generator | None = None) -> int:
    """Saves each row's image as ``00000.png``, ``00001.png``, ... and writes ``metadata.jsonl`` (in a random order
    when ``shuffle`` is given); returns the number of rows."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, caption, label, heldout) in enumerate(rows):
        name = f"{i:05d}.png"
        image.save(out / name)
        records.append({"file_name": name, "caption": caption, "label": label, "heldout": bool(heldout)})
    order = shuffle.permutation(len(records)) if shuffle is not None else range(len(records))
    (out / "metadata.jsonl").write_text("".join(json.dumps(records[i]) + "\n" for i in order))
    return len(records)


def write_class_lists(out: Path, every: Iterable[tuple[str, str]], heldout: Iterable[tuple[str, str]]) -> None:
    """``classnames.txt`` (every pair as "a b") and ``heldout.txt`` (the held-out pairs)."""
    every, held = list(every), set(heldout)
    (out / "classnames.txt").write_text("".join(f"{a} {b}\n" for a, b in every))
    (out / "heldout.txt").write_text("".join(f"{a} {b}\n" for a, b in every if (a, b) in held))


__all__ = ["Row", "already_written", "write_class_lists", "write_split"]
