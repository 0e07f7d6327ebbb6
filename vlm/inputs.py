"""Input handling shared by the command-line scripts: expanding paths, loading images in batches, error records.

A bad input never stops the others: each yields either a tensor or an error message, and the script prints one
line for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """Folders become their image files in sorted order (non-recursive); other paths are kept as given, so a
    missing or unreadable one still gets its own error line later."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            out.extend(files)
        else:
            out.append(path)
    return out


def folder_metadata(paths: Sequence[Path]) -> dict[Path, dict]:
    """Rows of the ``metadata.jsonl`` files (Hugging Face imagefolder layout) next to the given images, by path."""
    rows: dict[Path, dict] = {}
    for folder in sorted({p.parent for p in paths}):
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            continue
        with meta.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if "file_name" in row:
                        rows[folder / row["file_name"]] = row
    return rows


@dataclass
class LoadedBatch:
    """A batch of inputs: ``images`` holds the ones that loaded, ``errors`` the message for each that did not."""

    paths: list[Path]
    images: Tensor | None  # (n_ok, c, h, w)
    ok_paths: list[Path]
    errors: dict[Path, str]


def load_batches(
    paths: Sequence[Path], transform: Callable, batch_size: int = 32
) -> Iterator[LoadedBatch]:
    """Loads images ``batch_size`` at a time with :func:`vlm.data.images.load_image` and ``transform``; a file
    that fails gets the reason in ``errors`` instead."""
    from vlm.data.images import ImageLoadError, load_image

    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start : start + batch_size])
        tensors, ok, errors = [], [], {}
        for path in chunk:
            try:
                tensors.append(transform(load_image(path)))
                ok.append(path)
            except ImageLoadError as e:
                errors[path] = e.reason
        images = torch.stack(tensors) if tensors else None
        yield LoadedBatch(chunk, images, ok, errors)
