"""What zero-shot classification needs of a trained CLIP task, loaded without importing Lightning.

Importing Lightning takes longer than importing PyTorch: it imports torchmetrics, which imports transformers and
SciPy. For ``scripts/zero_shot.py`` on a few images that was most of the run. A :class:`ContrastiveTask` therefore
writes the settings inference needs into its checkpoints (``checkpoint["inference"]``: the resolved tokenizer
config, prompt templates and image statistics, see ``ContrastiveTask.on_save_checkpoint``), and
:func:`load_zero_shot` rebuilds the CLIP model from the checkpoint's own config with jsonargparse (the library
LightningCLI builds it with, without Lightning) plus those settings; ``vlm export`` writes them into the export's
``config.json``. A checkpoint or export without them (written before they existed, or by hand) goes through the
full task (:func:`vlm.checkpoint.load_task`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlm.checkpoint import CheckpointError, read_checkpoint, task_config

CONTRASTIVE_TASK = "vlm.tasks.contrastive.ContrastiveTask"
INFERENCE_KEY = "inference"


@dataclass
class ZeroShotModel:
    """A trained CLIP with what classifying images needs: its tokenizer, prompt templates and image statistics."""

    model: nn.Module
    tokenizer: Any
    templates: str | list[str]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def image_size(self) -> int:
        return self.model.visual.image_size


def zero_shot_settings(task: Any) -> dict[str, Any] | None:
    """The settings a :class:`ZeroShotModel` needs besides the weights, as plain data for a checkpoint, or None
    where the task's tokenizer was passed as an object rather than a config (it could not be rebuilt)."""
    config = task.hparams.get("tokenizer")
    if config is None:  # the task built its default tokenizer, whose own defaults rebuild it
        cls = type(task.tokenizer)
        config = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {}}
    if not (isinstance(config, dict) and isinstance(config.get("class_path"), str)):
        return None
    templates = task.templates if isinstance(task.templates, str) else list(task.templates)
    if not all(isinstance(t, str) for t in ([templates] if isinstance(templates, str) else templates)):
        return None  # callables: only the task itself holds them
    return {"tokenizer": config, "templates": templates, "image_mean": list(task.image_mean),
            "image_std": list(task.image_std)}  # fmt: skip


def load_zero_shot(path: str | Path) -> ZeroShotModel:
    """A :class:`ZeroShotModel` from a ``vlm fit`` checkpoint of a CLIP task or a ``vlm export`` directory, in eval
    mode on the CPU; without Lightning where the checkpoint records its inference settings.

    Raises:
        CheckpointError: the file is missing, unreadable, unsafe, not a CLIP task, or does not match its config.
    """
    from vlm.interop.export import CONFIG_FILE, load_weights, read_export_config, read_export_weights

    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).exists():  # a vlm export
        config = read_export_config(path)
        settings, weights = config.get(INFERENCE_KEY), None
    else:
        ckpt = read_checkpoint(path)
        config, settings, weights = task_config(ckpt["hyper_parameters"]), ckpt.get(INFERENCE_KEY), ckpt["state_dict"]
    if config["class_path"] != CONTRASTIVE_TASK or not isinstance(settings, dict):
        return _through_task(path)  # also where the task is of another kind: its error message says so
    holder = nn.Module()  # the task's layout: its weights are named model.*
    holder.model = _instantiate_model(config.get("init_args", {}).get("model"), path)
    weights = read_export_weights(path) if weights is None else weights
    load_weights(holder, {k: v for k, v in weights.items() if k.startswith("model.")}, path)
    return ZeroShotModel(
        model=holder.model.eval(),
        tokenizer=_instantiate_vlm_class(settings["tokenizer"], path),
        templates=settings["templates"],
        image_mean=tuple(settings["image_mean"]),
        image_std=tuple(settings["image_std"]),
    )


def _through_task(path: Path) -> ZeroShotModel:
    """The full task (Lightning), for checkpoints without inference settings and for exported directories."""
    from vlm.checkpoint import load_task
    from vlm.tasks.contrastive import ContrastiveTask

    task = load_task(path, expected=ContrastiveTask)
    return ZeroShotModel(task.model, task.tokenizer, task.templates, task.image_mean, task.image_std)


def _instantiate_model(config: Any, path: Path) -> nn.Module:
    """The CLIP of a task's ``model`` config (``class_path`` / ``init_args``, nested towers too), as LightningCLI
    builds it: jsonargparse checks it against the constructors' signatures and instantiates it."""
    from jsonargparse import ArgumentParser

    from vlm.models.clip import CLIP

    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not record its model config")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(CLIP, "model", required=True)
    try:
        return parser.instantiate_classes(parser.parse_object({"model": config})).model
    except Exception as e:  # jsonargparse reports a bad config in its own exception types
        raise CheckpointError(f"{path}: its model config does not build: {str(e).splitlines()[0]}") from None


def _instantiate_vlm_class(config: dict, path: Path) -> Any:
    """``class_path(**init_args)`` for a class of the vlm package (a checkpoint may not name other code)."""
    class_path = config.get("class_path", "")
    module_name, _, name = class_path.rpartition(".")
    if not module_name.startswith("vlm."):
        raise CheckpointError(f"{path}: refusing to build {class_path!r}: only vlm classes can be loaded")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        return cls(**config.get("init_args", {}))
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build {class_path!r}: {e}") from None


__all__ = ["ZeroShotModel", "load_zero_shot", "zero_shot_settings"]
