"""``user``: where a user waits, side by side in one run, each row against the floor or the peer it is judged by.

- cold ``scripts/zero_shot.py`` and ``vlm.load`` + ``classify`` on one image against ``import torch`` plus a
  ``torch.load`` of the same checkpoint (goal: at most 1.3x);
- warm ``classify`` of one image against 36 cached labels against the bare ``encode_image`` of that image (goal: at
  most 1.3x);
- a folder through ``vlm index``'s path against open_clip's ``encode_image`` over a 2-worker ``DataLoader``
  (:mod:`benchmarks.folder`);
- ``vlm serve`` under 32 concurrent requests: p95 against a lone request's p50 (:mod:`benchmarks.serving`).

The rows are those of the ``scripts``, ``serve`` and folder measurements, relabelled ``user``; the shapes CLIP of
``configs/clip/shapes.yaml``, untrained (the weights do not change the cost).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.core import Row, Settings, interleaved_medians, make_row, skip_row

SUITE = "user"
WARM_LABELS = 36  # the shapes classes


def _as_user(rows: Iterator[Row]) -> Iterator[Row]:
    for row in rows:
        yield dataclasses.replace(row, suite=SUITE)


def warm_rows(ckpt: Path, image: str, settings: Settings) -> Iterator[Row]:
    """Warm ``classify`` of one image (its classifier for the label set built once and cached) against the bare
    ``encode_image`` of the same, already preprocessed, image."""
    import vlm
    from vlm.data.images import load_image

    model = vlm.load(ckpt)
    labels = [f"class {i}" for i in range(WARM_LABELS)]
    decoded = load_image(image)  # a user's decoded image: classify preprocesses it, as it must
    pixels = model.preprocess(decoded)
    pixels = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
    model.classify(decoded, labels)  # builds and caches the classifier
    with torch.inference_mode():
        t = interleaved_medians({"ours": lambda: model.classify(decoded, labels, top_k=1),
                                 "peer": lambda: model.model.encode_image(pixels, normalize=True)},
                                repeats=settings.pick(50, 3))  # fmt: skip
    name = (f"warm classify, 1 decoded image x {WARM_LABELS} cached labels (preprocessing included) vs the bare "
            f"encode_image of the preprocessed image")
    yield make_row(SUITE, name, 1000 * t["ours"], "ms", 1000 * t["peer"])


def run(settings: Settings) -> Iterator[Row]:
    from benchmarks.folder import folder_rows
    from benchmarks.scripts import shapes_clip, startup_rows
    from benchmarks.serving import serve_rows

    with shapes_clip(settings) as made:
        if made is None:
            yield skip_row(SUITE, "configs/clip/shapes.yaml does not exist")
            return
        ckpt, image, labels = made
        yield from _as_user(startup_rows(ckpt, image, ["--labels", ",".join(labels)], settings))
        yield from warm_rows(ckpt, image, settings)
        yield from _as_user(folder_rows(settings))
        if not settings.quick:  # the quick check of the serve rows is the serve suite's (a server takes seconds)
            yield from _as_user(serve_rows(ckpt, image, labels, settings))


__all__ = ["run", "warm_rows"]
