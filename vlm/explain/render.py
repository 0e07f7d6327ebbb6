"""Attention maps drawn over their image: one PNG per image, one panel per map (matplotlib, no display needed)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm.explain.maps import Explanation


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
    """Writes the image and each map as a heat overlay side by side into ``out`` (a PNG); returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


__all__ = ["overlay", "render", "upsample"]
