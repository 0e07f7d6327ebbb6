"""Loading vlm's files: a whole task, or a model with its inference settings (without Lightning's import).

:func:`load_task` rebuilds any task from a ``.ckpt`` or an export. :func:`load_zero_shot` and :func:`load_captioner`
build only the model from the file's config and take the rest from its ``inference`` block (see
:mod:`vlm.formats.settings`); a file without one goes through its whole task. Every path builds through
:mod:`vlm.formats.build` (allow-list, bounds, a ``meta``-device check against the weights' shapes before any real
tensor is allocated), and every setting read here is checked against bounds and against the model it belongs to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm.formats.build import (
    CheckpointError,
    build,
    build_checked,
    check_class_path,
    check_plain,
    check_setting,
    copy_weights,
    resolve_class,
)
from vlm.formats.checkpoint import (
    INFERENCE_KEY,
    current_config,
    current_weight_names,
    read_checkpoint,
    task_config,
    task_hparams_quiet,
    with_config,
)
from vlm.formats.export import is_export, read_export_config, read_export_weights, weight_shapes
from vlm.generation import Captioner
from vlm.zero_shot import POOLINGS, ZeroShotModel

if TYPE_CHECKING:
    from lightning import LightningModule

CONTRASTIVE_TASK = "vlm.tasks.contrastive.ContrastiveTask"
FLAMINGO_TASK = "vlm.tasks.captioning.FlamingoTask"
MODEL_PREFIX = "model."  # a task's model weights are named model.*
# Beams x new tokens x context positions one image's default decoding may cost: 8 beams of 128 tokens over a
# 4,096-token context, or 3 beams of 1,365 over 1,024; the attention work of a step grows with the context.
GENERATION_WORK = 1 << 22


def _hf_refusals(load: Callable) -> Callable:
    """``load`` with a Hugging Face part's refusal (a tokenizer or config directory the file names that vlm will not
    use, raised when the part is first used) turned into :class:`CheckpointError`, as every other refusal."""
    from vlm.models.hf_local import HFFileError

    @functools.wraps(load)
    def checked(path: str | Path, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(path, *args, **kwargs)
        except HFFileError as e:
            raise CheckpointError(f"{path}: {e}") from None

    return checked


def shapes_of(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


@dataclass
class TaskFile:
    """A ``.ckpt`` or export read once: its task config, inference settings (or None), the weights' names and shapes,
    and a function that gives the weights (memory-mapped for a checkpoint, read on call for an export)."""

    config: dict
    settings: Any
    shapes: dict[str, tuple[int, ...]]
    weights: Callable[[], dict]

    @property
    def class_path(self) -> str:
        return self.config["class_path"]


def read_task_file(path: str | Path) -> TaskFile:
    """Reads a checkpoint or export once, building nothing; its task class must be one of vlm's tasks."""
    path, where = Path(path), str(path)
    if is_export(path):
        raw = read_export_config(path)
        config = current_config({k: v for k, v in raw.items() if k != INFERENCE_KEY})
        file = TaskFile(config, raw.get(INFERENCE_KEY), current_weight_names(weight_shapes(path)),
                        lambda: current_weight_names(read_export_weights(path)))
    else:
        ckpt = read_checkpoint(path)
        weights = current_weight_names(ckpt["state_dict"])
        file = TaskFile(task_config(ckpt["hyper_parameters"], where), ckpt.get(INFERENCE_KEY), shapes_of(weights),
                        lambda: weights)  # fmt: skip
    check_class_path(file.class_path, where, "config", ("task",))
    return file


@_hf_refusals
def load_task(path: str | Path, expected: str | None = None, file: TaskFile | None = None) -> LightningModule:
    """Rebuilds a task from a Lightning checkpoint or an exported weights directory, in eval mode on the CPU.

    Args:
        path: a ``.ckpt`` file written by ``vlm fit`` or a directory written by ``vlm export``.
        expected: the class path of the task class the caller can use (default: any of vlm's tasks); another kind
            raises :class:`CheckpointError` before anything is built.
        file: the file as :func:`read_task_file` already read it (default: read here).
    """
    file = file or read_task_file(path)
    cls = resolve_class(file.class_path, str(path), "config", ("task",))
    if expected is not None:
        wanted = resolve_class(expected, "load_task", "expected", ("task",))
        if not issubclass(cls, wanted):
            raise CheckpointError(f"{path} holds a {cls.__name__}, but this needs a {wanted.__name__}")
    with task_hparams_quiet():
        task = with_config(build_checked(file.config, file.shapes, str(path), ("task",)), file.config)
    copy_weights(task, file.weights(), str(path))
    return task.eval()


def load_model(path: str | Path) -> ZeroShotModel | Captioner:
    """What a ``vlm fit`` checkpoint or ``vlm export`` directory holds, ready to use: a :class:`ZeroShotModel` for a
    CLIP task, a :class:`Captioner` for a Flamingo task. The file is read once (:func:`read_task_file`).

    Raises:
        CheckpointError: the file is missing, unreadable or refused, or holds a task with no inference use (a
            language model).
    """
    file = read_task_file(path)
    if file.class_path == CONTRASTIVE_TASK:
        return load_zero_shot(path, file)
    if file.class_path == FLAMINGO_TASK:
        return load_captioner(path, file)
    raise CheckpointError(f"{path} holds a {file.class_path.rpartition('.')[2]}: vlm.load serves CLIP "
                          "(ContrastiveTask) and Flamingo (FlamingoTask) checkpoints")


@_hf_refusals
def load_zero_shot(path: str | Path, file: TaskFile | None = None) -> ZeroShotModel:
    """A :class:`ZeroShotModel` from a ``vlm fit`` checkpoint of a CLIP task or a ``vlm export`` directory, in eval
    mode on the CPU (``file``: the file as :func:`read_task_file` already read it).

    Raises:
        CheckpointError: the file is missing, unreadable, refused, not a CLIP task, or does not match its config.
    """
    path = Path(path)
    file = file or read_task_file(path)
    if not _has_settings(file, CONTRASTIVE_TASK):
        task = load_task(path, expected=CONTRASTIVE_TASK, file=file)
        return ZeroShotModel(task.model, task.tokenizer, task.templates, task.image_mean, task.image_std,
                             getattr(task, "template_pooling", "mean"))
    model, settings = _load_model(path, file)
    where = str(path)
    _require(settings, ("tokenizer", "templates", "image_mean", "image_std"), where)
    for name in ("templates", "image_mean", "image_std"):
        check_setting(name, settings[name], where, f"{INFERENCE_KEY}.{name}")
    pooling = settings.get("template_pooling", "mean")  # files from before it existed: CLIP's mean
    if pooling not in POOLINGS:
        raise CheckpointError(f"{where}: refused {INFERENCE_KEY}.template_pooling: not one of {POOLINGS}")
    tokenizer = build(settings["tokenizer"], where, ("tokenizer",), f"{INFERENCE_KEY}.tokenizer")
    text_length = getattr(getattr(model, "text", None), "context_length", None)
    length = getattr(tokenizer, "context_length", text_length)
    if text_length is not None and (not isinstance(length, int) or length > text_length):
        raise CheckpointError(f"{where}: refused {INFERENCE_KEY}.tokenizer: context_length "
                              f"{tokenizer.context_length} is longer than the text tower's {text_length}")
    return ZeroShotModel(model=model, tokenizer=tokenizer, templates=settings["templates"],
                         image_mean=tuple(float(x) for x in settings["image_mean"]),
                         image_std=tuple(float(x) for x in settings["image_std"]),
                         template_pooling=pooling)  # fmt: skip


@_hf_refusals
def load_captioner(path: str | Path, file: TaskFile | None = None) -> Captioner:
    """A :class:`Captioner` from a ``vlm fit`` checkpoint of a Flamingo task or a ``vlm export`` directory, in eval
    mode on the CPU (``file``: the file as :func:`read_task_file` already read it).

    Raises:
        CheckpointError: the file is missing, unreadable, refused, not a Flamingo task, or does not match its config.
    """
    path = Path(path)
    file = file or read_task_file(path)
    if not _has_settings(file, FLAMINGO_TASK):
        return check_generation_work(load_task(path, expected=FLAMINGO_TASK, file=file).captioner(), str(path))
    model, settings = _load_model(path, file)
    where = str(path)
    names = ("tokenizer", "image_size", "image_mean", "image_std", "max_new_tokens", "num_beams", "vocab_ids",
             "attribute_words")
    _require(settings, names, where)
    for name in ("image_size", "image_mean", "image_std", "max_new_tokens", "num_beams"):
        check_setting(name, settings[name], where, f"{INFERENCE_KEY}.{name}")
    tower_size = getattr(model.vision, "image_size", None)
    if tower_size is not None and settings["image_size"] != tower_size:
        raise CheckpointError(f"{where}: refused {INFERENCE_KEY}.image_size: {settings['image_size']} but the vision "
                              f"tower takes {tower_size}")
    tokenizer = build(settings["tokenizer"], where, ("tokenizer",), f"{INFERENCE_KEY}.tokenizer")
    vocab = model.decoder.vocab_size
    length = getattr(tokenizer, "context_length", None)
    if (getattr(tokenizer, "vocab_offset", vocab) != vocab or not isinstance(length, int)
            or length > model.context_length):  # fmt: skip
        raise CheckpointError(f"{where}: refused {INFERENCE_KEY}.tokenizer: it does not fit the decoder (vocabulary "
                              f"offset {getattr(tokenizer, 'vocab_offset', None)} vs {vocab} embeddings, context "
                              f"{tokenizer.context_length} vs {model.context_length})")
    ids = settings["vocab_ids"]
    total = model.vocab_size  # the decoder's ids and the new tokens
    if ids is not None and (not isinstance(ids, list) or not ids or ids != sorted(set(ids))
                            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < total for i in ids)):
        raise CheckpointError(f"{where}: refused {INFERENCE_KEY}.vocab_ids: expected sorted, distinct token ids in "
                              f"[0, {total})")
    words = settings["attribute_words"]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise CheckpointError(f"{where}: refused {INFERENCE_KEY}.attribute_words: expected a list of words")
    return check_generation_work(Captioner(
        model=model, tokenizer=tokenizer, image_size=settings["image_size"],
        image_mean=tuple(float(x) for x in settings["image_mean"]),
        image_std=tuple(float(x) for x in settings["image_std"]), max_new_tokens=settings["max_new_tokens"],
        num_beams=settings["num_beams"], vocab_ids=ids, attribute_words=words), where)


def check_generation_work(captioner: Captioner, where: str) -> Captioner:
    """Refuses decoding defaults whose work per image no real captioner needs, although each is within its own
    bound: beams x new tokens x context positions over :data:`GENERATION_WORK` (64 beams of 4,096 tokens over a
    4,096-token context would take minutes per image), or a restricted vocabulary without a stop token (every
    caption would then run to its full length)."""
    context = int(getattr(captioner.model, "context_length", 0) or 0)
    work = captioner.num_beams * captioner.max_new_tokens * max(context, 1)
    if work > GENERATION_WORK:
        raise CheckpointError(f"{where}: refused {INFERENCE_KEY}: num_beams {captioner.num_beams} x max_new_tokens "
                              f"{captioner.max_new_tokens} x context {context} = {work:,} is over the "
                              f"{GENERATION_WORK:,} a captioner may ask for per image")
    tok = captioner.tokenizer
    stops = {getattr(tok, "end_of_chunk_token_id", None), getattr(tok, "eos_token_id", None)} - {None}
    if captioner.vocab_ids is not None and not stops & set(captioner.vocab_ids):
        raise CheckpointError(f"{where}: refused {INFERENCE_KEY}.vocab_ids: it holds no stop token, so no caption "
                              "could end before max_new_tokens")
    return captioner


def _require(settings: dict, names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in settings]
    if missing:
        raise CheckpointError(f"{where}: its inference settings are incomplete (no {', '.join(missing)})")


def _has_settings(file: TaskFile, task_class_path: str) -> bool:
    """Whether ``file`` holds a ``task_class_path`` task with inference settings: its model is then built alone by
    :func:`_load_model`; other files (older ones without settings, another task kind) go through the task."""
    return file.config["class_path"] == task_class_path and isinstance(file.settings, dict)


def _load_model(path: Path, file: TaskFile) -> tuple[nn.Module, dict]:
    """The model (weights loaded, eval mode) and inference settings of a file :func:`_has_settings` accepts."""
    where, config, settings = str(path), file.config, file.settings
    check_plain(settings, where, INFERENCE_KEY)
    model_config = (config.get("init_args") or {}).get("model")
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{where} does not record its model config")
    model_shapes = {k[len(MODEL_PREFIX):]: s for k, s in file.shapes.items() if k.startswith(MODEL_PREFIX)}
    model = build_checked(model_config, model_shapes, where, ("model",), "config.init_args.model")
    weights = file.weights()
    copy_weights(model, {k[len(MODEL_PREFIX):]: v for k, v in weights.items() if k.startswith(MODEL_PREFIX)}, where)
    return model.eval(), settings


__all__ = ["CONTRASTIVE_TASK", "FLAMINGO_TASK", "GENERATION_WORK", "TaskFile", "check_generation_work",
           "load_captioner", "load_model", "load_task", "load_zero_shot", "read_task_file"]
