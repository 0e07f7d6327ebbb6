"""Attention maps drawn over their image: one PNG per image, one panel per map (matplotlib, no display needed),
and the files ``vlm explain`` writes, named from its inputs and kept inside its output folder."""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm.explain.maps import Explanation

RENDER_SIDE = 512  # the image is drawn at most this large: a panel is 220 px wide at 100 dpi
MAX_NAME_BYTES = 200  # an output name, leaving room for a suffix and ".json" under the usual 255-byte limit


class OutputPathError(ValueError):
    """An output file that would land outside its folder; the message names it."""


def output_name(path: str | os.PathLike, taken: set[str]) -> str:
    """A file name stem for ``path``'s outputs that stays inside the output folder, and is not in ``taken``.

    The input's stem with every path separator, control character and leading dot removed (``..png`` has the
    stem ``.``, which would name the folder itself, or its parent for ``...png``), shortened to
    :data:`MAX_NAME_BYTES`; ``image`` when nothing is left. A name already given (compared without case, as a
    case-insensitive file system would) gets ``_2``, ``_3``... The name is added to ``taken``.
    """
    stem = Path(os.fsdecode(path)).stem
    stem = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in stem).lstrip(". ")
    stem = stem.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", "ignore") or "image"
    name, number = stem, 1
    while name.casefold() in taken:
        number += 1
        name = f"{stem}_{number}"
    taken.add(name.casefold())
    return name


def inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder/name``, checked to be a direct child of ``folder`` once both are resolved.

    Raises:
        OutputPathError: ``name`` holds a separator, is ``.`` or ``..``, or resolves elsewhere.
    """
    root = Path(os.path.realpath(folder))
    target = root / name
    if name in ("", ".", "..") or target.name != name or Path(os.path.realpath(target.parent)) != root:
        raise OutputPathError(f"refused output name {name!r}: it would be written outside {folder}")
    return target


def _write_atomic(target: Path, write: Callable[[str], None]) -> None:
    """Calls ``write`` on a hidden temporary file beside ``target`` and renames it onto ``target``: a symbolic link
    already at ``target`` is replaced, never followed, and a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=target.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``target`` atomically (see :func:`_write_atomic`); returns its path."""
    target = Path(target)
    _write_atomic(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return target


def upsample(grid_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (gh, gw) map bilinearly resized to ``size`` (w, h) and scaled to [0, 1]."""
    m = grid_map.detach().float()[None, None]
    up = torch.nn.functional.interpolate(m, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0]
    up = up - up.min()
    return (up / up.max().clamp(min=1e-12)).numpy()


def overlay(image: Image.Image, grid_map: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``grid_map`` blended over it as a heat map (jet colours), the same size."""
    from matplotlib import colormaps

    heat = colormaps["jet"](upsample(grid_map, image.size))[..., :3]  # (h, w, 3) in [0, 1]
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * rgb + alpha * heat)))


def _panels(exp: Explanation, max_labels: int) -> list[tuple[str, torch.Tensor]]:
    if exp.words:
        return [(f"'{token}'", m) for token, m in exp.words]
    best = sorted(exp.labels, key=lambda k: -exp.scores.get(k, 0.0))[:max_labels]
    panels = [(f"{label} ({exp.scores[label]:.2f})", exp.labels[label]) for label in best]
    return panels + [(name.replace("_", " "), m) for name, m in exp.maps.items()]


def render(image: Image.Image, exp: Explanation, out: str | os.PathLike, max_labels: int = 4,
           title: str | None = None) -> Path:
    """Writes the image and each map as a heat overlay side by side into ``out`` (a PNG, written atomically);
    returns its path. A large image is drawn reduced to :data:`RENDER_SIDE` pixels (the panels are small), so the
    maps are never upsampled to a full-size image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if max(image.size) > RENDER_SIDE:
        image = image.copy()
        image.thumbnail((RENDER_SIDE, RENDER_SIDE))
    rgb = np.asarray(image.convert("RGB"))
    panels = _panels(exp, max_labels)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.2 * (len(panels) + 1), 2.5), squeeze=False)
    axes[0, 0].imshow(rgb)
    heading = title or (exp.caption if exp.caption is not None else "image")
    axes[0, 0].set_title(textwrap.fill(heading, 28), fontsize=8)
    for ax, (name, grid_map) in zip(axes[0, 1:], panels):
        ax.imshow(rgb)
        ax.imshow(upsample(grid_map, image.size), cmap="jet", alpha=0.5)
        ax.set_title(name, fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    try:
        _write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return out


__all__ = ["OutputPathError", "inside", "output_name", "overlay", "render", "upsample", "write_text"]
