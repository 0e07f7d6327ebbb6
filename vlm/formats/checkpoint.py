"""Lightning checkpoints (``vlm fit``'s ``.ckpt``): reading them without unpickling code, and tasks built from configs.

A task's hyper-parameters are its constructor config (``class_path`` / ``init_args`` dicts, exactly what
LightningCLI saw), so a checkpoint holds only tensors and plain containers: it is read with
``torch.load(weights_only=True)`` (a file whose unpickling would run code is refused), memory-mapped (its tensors
are not read until they are copied), and its config goes through :func:`vlm.formats.build.build_checked`.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlm.data.files import UnsafeFileError, check_regular
from vlm.formats.build import CheckpointError, build

if TYPE_CHECKING:  # Lightning is imported only where a task is built: reading a checkpoint does not need it
    from lightning import LightningModule

CHECKPOINT_LIMIT = 1 << 40  # bytes; the tensors are memory-mapped, so this only refuses absurd sizes
INFERENCE_KEY = "inference"  # the resolved settings inference needs, beside the weights (see vlm.formats.settings)


def build_task(config: dict[str, Any], where: str = "config") -> LightningModule:
    """Builds a task from ``{"class_path": ..., "init_args": {...}}`` (vlm's tasks only, nested models and
    tokenizers as ``class_path`` dicts); its hyper-parameters are this config, so its checkpoints load back."""
    with task_hparams_quiet():
        return with_config(build(config, where, ("task",)), config)


@contextlib.contextmanager
def task_hparams_quiet() -> Iterator[None]:
    """A task's ``save_hyperparameters()`` warns that its model argument is a module; :func:`with_config` then
    replaces those hyper-parameters with the config, so the warning says nothing true."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attribute .* is an instance of `nn.Module`")
        yield


def with_config(task: LightningModule, config: dict[str, Any]) -> LightningModule:
    """Records ``config`` as the task's hyper-parameters (as LightningCLI does) instead of the built objects."""
    hparams = {"_class_path": config["class_path"], **(config.get("init_args") or {})}
    task.save_hyperparameters(hparams)
    return task


def task_config(hparams: dict[str, Any], where: str = "the checkpoint") -> dict[str, Any]:
    """The ``{"class_path", "init_args"}`` config of a task from its saved hyper-parameters."""
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{where}: refused hyper_parameters: not a mapping")
    hp = dict(hparams)
    class_path = hp.pop("_class_path", None)
    hp.pop("_instantiator", None)
    if class_path is None:
        raise CheckpointError(
            f"{where} does not record its task class (was the task built with vlm fit or vlm.formats.build_task?)"
        )
    return {"class_path": class_path, "init_args": hp}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a Lightning checkpoint file with ``weights_only=True`` (tensors memory-mapped); errors become
    :class:`CheckpointError`."""
    path = Path(path)
    try:
        check_regular(path, "checkpoint")
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    if path.stat().st_size > CHECKPOINT_LIMIT:
        raise CheckpointError(f"{path} is larger than {CHECKPOINT_LIMIT:,} bytes")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"{path} is not a readable checkpoint (not a PyTorch checkpoint archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # torch explains at length; the line naming the refused global is the one that matters
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln] or ["it holds Python objects"]
        raise CheckpointError(
            f"{path} is not a safe checkpoint: refused to unpickle it ({lines[0]}); vlm loads only tensors and "
            "plain containers"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint: {str(e).splitlines()[0] if str(e) else e!r}"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not a vlm training checkpoint (no state_dict / hyper_parameters)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise CheckpointError(f"{path}: refused state_dict: it holds entries that are not named tensors")
    return ckpt


__all__ = ["CheckpointError", "INFERENCE_KEY", "build_task", "read_checkpoint", "task_config"]
