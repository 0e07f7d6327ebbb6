"""What the scripts need of a trained task, loaded without importing Lightning.

Importing Lightning takes longer than importing PyTorch: it imports torchmetrics, which imports transformers and
SciPy. For ``scripts/zero_shot.py`` or ``scripts/caption.py`` on a few images that was most of the run. The CLIP and
Flamingo tasks therefore write the settings inference needs into their checkpoints (``checkpoint["inference"]``:
the resolved tokenizer config, prompt templates or decoding defaults, image statistics; see their
``inference_settings``), ``vlm export`` writes them into the export's ``config.json``, and :func:`load_zero_shot` /
:func:`load_captioner` rebuild the model from the file's own config with jsonargparse (the library LightningCLI
builds it with, without Lightning) plus those settings. A file without them (written before they existed, or by
hand) goes through the full task (:func:`vlm.checkpoint.load_task`), as does one of another task kind, whose error
message says so.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlm.checkpoint import CheckpointError, read_checkpoint, task_config

CONTRASTIVE_TASK = "vlm.tasks.contrastive.ContrastiveTask"
FLAMINGO_TASK = "vlm.tasks.captioning.FlamingoTask"
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


@dataclass
class Captioner:
    """A trained Flamingo with what captioning needs: its tokenizer, image statistics and decoding defaults."""

    model: nn.Module
    tokenizer: Any
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_new_tokens: int
    num_beams: int
    vocab_ids: list[int] | None  # decoding restricted to these ids (the task's ``vocabulary``), or None
    attribute_words: list[str]  # the words attribute accuracy compares

    @torch.no_grad()
    def generate_captions(
        self,
        images: Tensor,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Captions of a batch of images (greedy or beam search; defaults from the task's arguments).

        ``images`` is (b, 3, H, W), or (b, T, 3, H, W) with a ``prompt`` holding T ``<image>`` markers (few-shot);
        ``kwargs`` go to :func:`vlm.generation.generate` (e.g. ``length_penalty``, ``do_sample``, ``top_p``).
        """
        from vlm.generation import caption_images

        if self.vocab_ids is not None:
            kwargs.setdefault("allowed_token_ids", self.vocab_ids)
        return caption_images(self.model, self.tokenizer, images, prompt, max_new_tokens or self.max_new_tokens,
                              num_beams or self.num_beams, **kwargs)  # fmt: skip


def caption_settings(captioner: Captioner) -> dict[str, Any]:
    """A :class:`Captioner`'s settings besides the model, as plain data (its Flamingo tokenizer as the config that
    rebuilds it)."""
    tok = captioner.tokenizer
    tokenizer = {"class_path": f"{type(tok).__module__}.{type(tok).__qualname__}",
                 "init_args": {"name_or_path": tok.name_or_path, "context_length": tok.context_length,
                               "vocab_offset": tok.vocab_offset, "prompt": tok.prompt}}  # fmt: skip
    return {"tokenizer": tokenizer, "image_size": captioner.image_size, "image_mean": list(captioner.image_mean),
            "image_std": list(captioner.image_std), "max_new_tokens": captioner.max_new_tokens,
            "num_beams": captioner.num_beams, "vocab_ids": captioner.vocab_ids,
            "attribute_words": list(captioner.attribute_words)}  # fmt: skip


def load_zero_shot(path: str | Path) -> ZeroShotModel:
    """A :class:`ZeroShotModel` from a ``vlm fit`` checkpoint of a CLIP task or a ``vlm export`` directory, in eval
    mode on the CPU; without Lightning where the file records its inference settings.

    Raises:
        CheckpointError: the file is missing, unreadable, unsafe, not a CLIP task, or does not match its config.
    """
    from vlm.models.clip import CLIP

    path = Path(path)
    loaded = _load_without_task(path, CONTRASTIVE_TASK, CLIP)
    if loaded is None:
        from vlm.checkpoint import load_task
        from vlm.tasks.contrastive import ContrastiveTask

        task = load_task(path, expected=ContrastiveTask)
        return ZeroShotModel(task.model, task.tokenizer, task.templates, task.image_mean, task.image_std)
    model, settings = loaded
    with _settings_checked(path):
        return ZeroShotModel(
            model=model,
            tokenizer=_instantiate_vlm_class(settings["tokenizer"], path),
            templates=settings["templates"],
            image_mean=tuple(float(x) for x in settings["image_mean"]),
            image_std=tuple(float(x) for x in settings["image_std"]),
        )


def load_captioner(path: str | Path) -> Captioner:
    """A :class:`Captioner` from a ``vlm fit`` checkpoint of a Flamingo task or a ``vlm export`` directory, in eval
    mode on the CPU; without Lightning where the file records its inference settings.

    Raises:
        CheckpointError: the file is missing, unreadable, unsafe, not a Flamingo task, or does not match its config.
    """
    from vlm.models.flamingo import Flamingo

    path = Path(path)
    loaded = _load_without_task(path, FLAMINGO_TASK, Flamingo)
    if loaded is None:
        from vlm.checkpoint import load_task
        from vlm.tasks.captioning import FlamingoTask

        return load_task(path, expected=FlamingoTask).captioner()
    model, settings = loaded
    with _settings_checked(path):
        return Captioner(
            model=model,
            tokenizer=_instantiate_vlm_class(settings["tokenizer"], path),
            image_size=int(settings["image_size"]),
            image_mean=tuple(float(x) for x in settings["image_mean"]),
            image_std=tuple(float(x) for x in settings["image_std"]),
            max_new_tokens=int(settings["max_new_tokens"]),
            num_beams=int(settings["num_beams"]),
            vocab_ids=None if settings["vocab_ids"] is None else [int(i) for i in settings["vocab_ids"]],
            attribute_words=[str(w) for w in settings["attribute_words"]],
        )


@contextlib.contextmanager
def _settings_checked(path: Path) -> Iterator[None]:
    """A missing or malformed inference setting (a file edited by hand) becomes a :class:`CheckpointError`."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its inference settings are incomplete or malformed ({e!r})") from None


def _load_without_task(path: Path, task_class_path: str, base: type) -> tuple[nn.Module, dict] | None:
    """The model (weights loaded, eval mode) and inference settings of a checkpoint or export of the task
    ``task_class_path``, or None where the file must go through the task (no settings, or another task kind)."""
    from vlm.interop.export import CONFIG_FILE, WEIGHTS_FILE, copy_weights, read_export_config, read_export_weights

    if path.is_dir() and (path / CONFIG_FILE).exists():  # a vlm export
        config = read_export_config(path)
        settings, weights = config.get(INFERENCE_KEY), None
    else:
        ckpt = read_checkpoint(path)
        config, settings, weights = task_config(ckpt["hyper_parameters"]), ckpt.get(INFERENCE_KEY), ckpt["state_dict"]
    if config["class_path"] != task_class_path or not isinstance(settings, dict):
        return None
    holder = nn.Module()  # the task's layout: its model's weights are named model.*
    holder.model = _instantiate_model(config.get("init_args", {}).get("model"), base, path)
    source = WEIGHTS_FILE if weights is None else "its state_dict"
    weights = read_export_weights(path) if weights is None else weights
    copy_weights(holder, {k: v for k, v in weights.items() if k.startswith("model.")}, path, source)
    return holder.model.eval(), settings


def _instantiate_model(config: Any, base: type, path: Path) -> nn.Module:
    """The ``base`` model of a task's ``model`` config (``class_path`` / ``init_args``, nested parts too), as
    LightningCLI builds it: jsonargparse checks it against the constructors' signatures and instantiates it."""
    from jsonargparse import ArgumentParser

    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not record its model config")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "model", required=True)
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


__all__ = ["Captioner", "ZeroShotModel", "caption_settings", "load_captioner", "load_zero_shot", "zero_shot_settings"]
