"""Do the maps land on the object? The pointing game on two-object scenes (:mod:`vlm.data.scenes`): a map *hits*
when its highest patch's centre lies inside the named object's box. Chance is the share of patch centres inside
that box (a peak placed at random); the map of the *other* object's label is also scored against this box, so a
map that only finds "some object" does not pass."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePath

import torch

from vlm.data.files import METADATA_LIMIT, read_text_bounded
from vlm.data.images import load_image
from vlm.explain.maps import Explanation


def _centre_in(row: int, col: int, box: list[float], cell: tuple[float, float]) -> bool:
    x, y = (col + 0.5) * cell[0], (row + 0.5) * cell[1]
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def peak_in_box(grid_map: torch.Tensor, box: list[float], cell: tuple[float, float]) -> bool:
    """Whether the centre of ``grid_map``'s highest cell lies in ``box`` (x0, y0, x1, y1), cells ``cell`` (w, h)."""
    row, col = divmod(int(grid_map.flatten().argmax()), grid_map.shape[1])
    return _centre_in(row, col, box, cell)


def chance_in_box(grid: tuple[int, int], box: list[float], cell: tuple[float, float]) -> float:
    """The share of cell centres inside ``box``: the hit rate of a peak placed at random."""
    inside = sum(_centre_in(r, c, box, cell) for r in range(grid[0]) for c in range(grid[1]))
    return inside / (grid[0] * grid[1])


def read_scenes(folder: str | os.PathLike, limit: int | None = None) -> list[tuple[Path, dict]]:
    """The (image path, metadata row) pairs of a ``vlm data scenes`` folder.

    ``metadata.jsonl`` is read with :func:`vlm.data.files.read_text_bounded` (a regular file within the metadata
    size bound); a row whose ``file_name`` is not a relative path inside the folder is refused (``ValueError``).
    """
    folder = Path(folder)
    text = read_text_bounded(folder / "metadata.jsonl", "metadata file", limit=METADATA_LIMIT)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()][:limit]
    out = []
    for row in rows:
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name or PurePath(name).is_absolute() or ".." in PurePath(name).parts:
            raise ValueError(f"a row's file_name {name!r} is not a relative path inside {folder}")
        out.append((folder / name, row))
    return out


def label_pointing(scored: list[tuple[Explanation, dict, tuple[int, int]]]) -> dict[str, float]:
    """The pointing game of per-label maps: ``(explanation, scene row, image size (w, h))`` triples, each
    explanation holding a map for both objects' labels -> ``hit`` (own label's peak in own box), ``other`` (the
    other object's label's peak in this box) and ``chance`` (a random peak in this box), over all objects."""
    hits = others = chance = 0.0
    count = 0
    for exp, row, (width, height) in scored:
        cell = (width / exp.grid[1], height / exp.grid[0])
        labels = [obj["label"] for obj in row["objects"]]
        for k, obj in enumerate(row["objects"]):
            hits += peak_in_box(exp.labels[labels[k]], obj["box"], cell)
            others += peak_in_box(exp.labels[labels[1 - k]], obj["box"], cell)
            chance += chance_in_box(exp.grid, obj["box"], cell)
            count += 1
    return {"objects": count, "hit": hits / count, "other": others / count, "chance": chance / count}


def clip_pointing(predictor, folder: str | os.PathLike, method: str = "relevance", limit: int | None = None,
                  templates=None) -> dict[str, float]:
    """:func:`label_pointing` of a CLIP predictor's per-label maps over a scenes folder."""
    scored = []
    for path, row in read_scenes(folder, limit):
        image = load_image(path)  # the one decoder: its checks and pixel budget (ImageLoadError is a ValueError)
        labels = [obj["label"] for obj in row["objects"]]
        scored.append((predictor.explain(image, labels, templates=templates, method=method)[0], row, image.size))
    return label_pointing(scored)


def caption_pointing(predictor, folder: str | os.PathLike, limit: int | None = None) -> dict[str, float]:
    """The pointing game of a captioner's per-word maps: for each object whose shape word the generated caption
    names once, whether that word's map peaks in the object's box (``hit``), against ``chance``."""
    hits = chance = 0.0
    count = 0
    for path, row in read_scenes(folder, limit):
        image = load_image(path)
        exp = predictor.explain(image)[0]
        cell = (image.width / exp.grid[1], image.height / exp.grid[0])
        words = [token.strip() for token, _ in exp.words]
        for obj in row["objects"]:
            shape = obj["label"].split(" ")[1]
            if words.count(shape) != 1:
                continue
            hits += peak_in_box(exp.words[words.index(shape)][1], obj["box"], cell)
            chance += chance_in_box(exp.grid, obj["box"], cell)
            count += 1
    return {"objects": count, "hit": hits / max(count, 1), "chance": chance / max(count, 1)}


__all__ = ["caption_pointing", "chance_in_box", "clip_pointing", "label_pointing", "peak_in_box", "read_scenes"]
