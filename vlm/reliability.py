"""Pieces that let a long run survive a crash: atomic, finite-only checkpoint writes and the random state to resume.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the target's directory, ``fsync``s it and
  renames it over the target (``os.replace`` is atomic on POSIX), then ``fsync``s the directory. A process killed
  mid-write leaves the previous ``last.ckpt`` whole (Lightning's own writer truncates the target first, or moves a
  file from ``/tmp`` across file systems). It also refuses to write weights or optimizer state that hold NaN or
  infinity, so the last good checkpoint is never replaced by a poisoned one.
- :func:`rng_state` / :func:`set_rng_state`: the Python, NumPy and torch (CPU and CUDA) generators as tensors and
  plain numbers only, so checkpoints that hold them still load with ``torch.load(weights_only=True)``. Lightning
  does not save them; :class:`vlm.callbacks.Checkpoint` does. :func:`snapshot_rng` / :func:`restore_rng` keep
  validation from moving the training stream.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

log = logging.getLogger("vlm.reliability")

TMP_PREFIX = ".tmp-"  # temporary checkpoint files: ".tmp-last.ckpt-XXXXXX"; never matched as a checkpoint


class NonFiniteError(RuntimeError):
    """Training met a NaN or an infinity it was told to stop on; the message names the step."""


def non_finite_entries(tree: Any, prefix: str = "") -> Iterator[str]:
    """Names of the floating-point tensors in a (nested) mapping or sequence that hold a NaN or an infinity."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            yield prefix or "<tensor>"
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from non_finite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from non_finite_entries(value, f"{prefix}[{i}]")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that replaces a checkpoint atomically and never writes non-finite weights.

    :class:`vlm.callbacks.Checkpoint` installs it on the strategy when the strategy uses Lightning's default
    ``TorchCheckpointIO``; it can also be given as ``trainer.plugins``. Remote paths (``s3://`` ...) fall back to
    Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        bad = [name for key in ("state_dict", "optimizer_states") for name in non_finite_entries(checkpoint.get(key),
                                                                                                  key)]
        if bad:
            log.error("not writing %s: non-finite values in %s%s; the previous checkpoint is kept", path,
                      ", ".join(bad[:3]), f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            return
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a synced temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the permissions torch.save would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # and the rename itself survives a power loss


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync directories
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Deletes temporary checkpoint files left by a process killed while writing."""
    directory = Path(directory)
    if directory.is_dir():
        for tmp in directory.glob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ random state
def rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors and ints (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def snapshot_rng() -> tuple[Any, ...]:
    """This process's random generators as they are (cheap; for restoring in the same process)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def restore_rng(snapshot: tuple[Any, ...]) -> None:
    """Puts back what :func:`snapshot_rng` took."""
    py, npy, cpu, cuda = snapshot
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteError",
    "atomic_torch_save",
    "non_finite_entries",
    "remove_stale_temporaries",
    "restore_rng",
    "rng_state",
    "set_rng_state",
    "snapshot_rng",
]
