"""Image files -> model inputs, in input order, decoded ahead of the model in worker processes.

:func:`model_inputs` yields, for each path in turn, its model input (a uint8 tensor (3, S, S): the file decoded by
:func:`vlm.data.images.load_image`, within its pixel budgets, then cut to the model's size by
:func:`vlm.data.transforms.eval_geometry`) or the reason it could not be read. With ``workers=0`` each file is
decoded in this process when its turn comes. With ``workers=N`` a :class:`torch.utils.data.DataLoader` over the
paths decodes them in N worker processes while the caller runs its model on the inputs before them.

- **Order and errors**: the loader returns chunks in the paths' order; a chunk's collate (:func:`collate_inputs`)
  keeps each file's reason beside the inputs that loaded, so one bad file costs only its own line.
- **Bounded memory**: a worker decodes one image at a time and cuts it before the next; the loader keeps at most
  ``workers x PREFETCH`` chunks of :data:`CHUNK` inputs ahead of the caller, whatever the number of paths. Only the
  small model inputs travel back (one shared-memory tensor per chunk), never a decoded picture.
- **Same bytes**: decoding and the evaluation geometry are deterministic, and a worker runs the same code on one
  thread (the DataLoader sets it): the inputs equal those of ``workers=0`` byte for byte (tested).
- **Start method**: ``fork`` on Linux, on purpose. A forked worker starts in tens of milliseconds with what this
  process has already imported (PIL, numpy, torch, the decoder) and imports nothing else; ``spawn`` and
  ``forkserver`` start a fresh interpreter per pool that imports torch again (1.2-1.4 s measured on a 2-core CPU) and
  re-run the calling script's main module. A worker touches neither the model, nor CUDA, nor the parent's thread
  pools (one thread, so no parallel region), which is what makes forking a process that has run a model safe.
  Elsewhere (macOS, where system libraries are not fork-safe, and Windows) it is ``spawn``: the dataset holds only
  paths and is picklable.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlm.data.images import ImageLoadError, load_image

CHUNK = 8  # inputs a worker decodes per task: one message and one shared-memory tensor each
PREFETCH = 2  # chunks each worker keeps ready ahead of the caller (DataLoader's prefetch_factor)
MAX_WORKERS = 64
# Below this many files no workers are started: starting one (fork, first chunk back) took 30-160 ms on a 2-core CPU,
# while the most a worker saves per file is its decode, 0.4-0.7 ms for a small PNG, 5.4 ms for a 640 x 480 JPEG.
MIN_FILES_FOR_WORKERS = 32


def default_workers(count: int) -> int:
    """Worker processes for ``count`` files: none for a handful (starting them costs more than they save), else one
    per CPU this process may use beyond two for the model, at most 2 (decoding a small image costs far less than a
    forward, so more would only take cores from the model). On 2 cores that is none: there one worker beside the
    model's threads made a folder slower (0.89x of decoding in process for ViT-B/32 on 96 photos, idle Intel Xeon:
    ``scripts/benchmark.py --suite user``)."""
    if count < MIN_FILES_FOR_WORKERS:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(2, cpus - 2))


def start_method() -> str:
    """``fork`` on Linux, ``spawn`` elsewhere (see the module docstring for why)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


class FileInputs(Dataset):
    """Item ``i`` is ``(model input, None)`` for ``paths[i]``, or ``(None, reason)`` when it cannot be read (or is
    in ``known_errors``, which gives the reason without opening it). ``image_size=None`` keeps the decoded RGB
    ``PIL`` image (in-process use only: :func:`model_inputs` sends only cut inputs between processes)."""

    def __init__(self, paths: Sequence[Path], image_size: int | None,
                 known_errors: Mapping[Path, str] | None = None) -> None:
        from vlm.data.transforms import eval_geometry

        self.paths = paths
        self.known_errors = dict(known_errors or {})
        self.geometry = eval_geometry(image_size) if image_size is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, str | None]:
        path = self.paths[i]
        if path in self.known_errors:
            return None, self.known_errors[path]
        try:
            image = load_image(path)
        except ImageLoadError as e:
            return None, e.reason
        if self.geometry is None:
            return image, None
        return self.geometry(image).as_subclass(torch.Tensor), None  # the decoded image is dropped here


def collate_inputs(items: list[tuple[Any, str | None]]) -> tuple[torch.Tensor | None, list[str | None]]:
    """A chunk as one uint8 tensor (k, 3, S, S) of the inputs that loaded (None if none did), and per item its
    reason or None, in order: the errors travel beside the inputs instead of stopping the chunk."""
    ok = [image for image, reason in items if reason is None]
    return (torch.stack(ok) if ok else None), [reason for _, reason in items]


def model_inputs(paths: Sequence[Path], image_size: int | None, workers: int = 0,
                 known_errors: Mapping[Path, str] | None = None) -> Iterator[tuple[Path, Any, str | None]]:
    """``(path, input, None)`` or ``(path, None, reason)`` for each of ``paths``, in order (see the module docstring).

    Args:
        paths: the files.
        image_size: the model's input side; ``None`` yields the decoded RGB images (``workers`` must then be 0).
        workers: decoding processes; 0 decodes each file here when its turn comes.
        known_errors: paths not to open, with the reason each gets.
    """
    if not 0 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be between 0 and {MAX_WORKERS}, got {workers}")
    if workers and image_size is None:
        raise ValueError("decoding in workers needs the model's image_size (only cut inputs travel between processes)")
    dataset = FileInputs(paths, image_size, known_errors)
    if workers == 0:
        for i, path in enumerate(paths):
            image, reason = dataset[i]
            yield path, image, reason
        return
    workers = min(workers, -(-len(paths) // CHUNK))
    if workers == 0:
        return
    loader = DataLoader(dataset, batch_size=CHUNK, num_workers=workers, collate_fn=collate_inputs,
                        prefetch_factor=PREFETCH, multiprocessing_context=multiprocessing.get_context(start_method()))
    chunks = iter(loader)
    try:
        start = 0
        for images, reasons in chunks:
            rows = iter(images if images is not None else ())
            for j, reason in enumerate(reasons):
                yield paths[start + j], (next(rows) if reason is None else None), reason
            start += len(reasons)
    finally:  # also when the caller stops early: the workers are ended now, not at garbage collection
        shutdown = getattr(chunks, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


__all__ = ["CHUNK", "PREFETCH", "FileInputs", "collate_inputs", "default_workers", "model_inputs", "start_method"]
