"""Building tasks from configs and loading them back from checkpoints, without unpickling code.

A task's hyper-parameters are its constructor config (``class_path`` / ``init_args`` dicts, exactly what
LightningCLI saw), so a checkpoint holds only tensors and plain containers. :func:`load_task` therefore reads it
with ``torch.load(weights_only=True)``: a crafted file that would run code when unpickled is refused instead.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # Lightning is imported only where a task is built: reading a checkpoint does not need it
    from lightning import LightningModule


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or of the wrong kind; the message says which."""


def _resolve_task_class(class_path: str) -> type[LightningModule]:
    """Imports ``class_path`` only if it names a LightningModule subclass inside the ``vlm`` package."""
    from lightning import LightningModule

    module_name, _, name = class_path.rpartition(".")
    if not module_name.startswith("vlm."):
        raise CheckpointError(f"refusing to build {class_path!r}: only tasks from the vlm package can be loaded")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"unknown task class {class_path!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise CheckpointError(f"{class_path!r} is not a LightningModule task")
    return cls


def build_task(config: dict[str, Any]) -> LightningModule:
    """Builds a task from ``{"class_path": ..., "init_args": {...}}`` exactly as LightningCLI does.

    Nested ``class_path`` dicts are instantiated by jsonargparse, and the task's saved hyper-parameters are this
    config (not module objects), so its checkpoints load with :func:`load_task`.
    """
    from lightning.pytorch.cli import instantiate_module
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    cls = _resolve_task_class(config["class_path"])
    init_args = dict(config.get("init_args", {}))
    hparams = {"_class_path": config["class_path"], **init_args}
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        return instantiate_module(cls, init_args)


def task_config(hparams: dict[str, Any]) -> dict[str, Any]:
    """The ``{"class_path", "init_args"}`` config of a task from its saved hyper-parameters."""
    hp = dict(hparams)
    class_path = hp.pop("_class_path", None)
    hp.pop("_instantiator", None)
    if class_path is None:
        raise CheckpointError(
            "the checkpoint does not record its task class "
            "(was the task built with vlm fit or vlm.checkpoint.build_task?)"
        )
    return {"class_path": class_path, "init_args": hp}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a Lightning checkpoint file with ``weights_only=True``; errors become :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without model.safetensors and config.json")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"{path} is not a readable checkpoint (not a PyTorch checkpoint archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch explains at length; the line naming the refused global is the one that matters
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln] or ["it holds Python objects"]
        raise CheckpointError(
            f"{path} is not a safe checkpoint: refused to unpickle it ({lines[0]}); vlm loads only tensors and "
            "plain containers"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint: {str(e).splitlines()[0] if str(e) else e!r}"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not a vlm training checkpoint (no state_dict / hyper_parameters)")
    return ckpt


def load_task(path: str | Path, expected: type | tuple[type, ...] | None = None) -> LightningModule:
    """Rebuilds a task from a Lightning checkpoint or an exported weights directory, in eval mode on the CPU.

    Args:
        path: a ``.ckpt`` file written by ``vlm fit`` or a directory written by ``vlm export``.
        expected: the task class(es) the caller can use (default: any task); any other kind raises
            :class:`CheckpointError`.
    """
    from lightning import LightningModule

    expected = LightningModule if expected is None else expected
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        from vlm.interop.export import load_exported

        task = load_exported(path)
    else:
        ckpt = read_checkpoint(path)
        config = task_config(ckpt["hyper_parameters"])
        cls = _resolve_task_class(config["class_path"])
        if not issubclass(cls, expected):
            raise CheckpointError(f"{path} holds a {cls.__name__}, but this needs a {_names(expected)}")
        task = build_task(config)
        missing, unexpected = task.load_state_dict(ckpt["state_dict"], strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path} does not match its own config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    if not isinstance(task, expected):
        raise CheckpointError(f"{path} holds a {type(task).__name__}, but this needs a {_names(expected)}")
    return task.eval()


def _names(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(t.__name__ for t in types)
