"""The one place that turns the contents of a file into objects, and the one check of weights against a model.

A checkpoint, an export's ``config.json`` and the ``inference`` block inside either are data, often from a
stranger. They name classes by ``class_path`` and give their arguments as ``init_args``. What may be built is a
closed list (:data:`BUILDABLE`): vlm's model classes, its tokenizers and its tasks. Never a function, never a class
outside the list, whatever package it lives in, and the list is checked *before* the named module is imported, so a
file cannot make Python import (and so run) anything else. The values are checked too: plain JSON-like data only,
bounded in size, known arguments only, and named settings within bounds no real model reaches
(:data:`BOUNDS`). Arguments that name a Hugging Face model or tokenizer must be an existing local directory: a file
cannot make vlm reach for a hub.

Memory and time are bounded by the weights: :func:`build_checked` first builds the model on the ``meta`` device
(no memory) while counting the parameters and buffers it registers, stopping as soon as it asks for more tensors
or elements than the weights hold, then compares every name and shape with the weights. Only a config that agrees
with its weights is built for real. A config asking for a depth of 100,000 or a width of 6,000 is refused in
milliseconds.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.zero_shot import TEMPLATE_SETS, check_template


class CheckpointError(ValueError):
    """A checkpoint, export or config that is missing, unreadable, refused or of the wrong kind; the message says
    which file, which key and why."""


# What a file may build, by role. Adding a class here is a security decision: its constructor must not run code,
# touch the network or write files whatever its (bounded, plain) arguments are.
BUILDABLE: dict[str, str] = {
    "vlm.models.clip.CLIP": "model",
    "vlm.models.vit.VisionTransformer": "model",
    "vlm.models.convnet.ConvNet": "model",
    "vlm.models.text.TextTransformer": "model",
    "vlm.models.decoder.DecoderLM": "model",
    "vlm.models.flamingo.Flamingo": "model",
    "vlm.models.perceiver.PerceiverResampler": "model",
    "vlm.models.hf_decoder.HFCausalLM": "model",
    "vlm.models.hf_text.HFTextEncoder": "model",
    "vlm.data.tokenizer.CLIPTokenizer": "tokenizer",
    "vlm.data.hf_tokenizer.HFTokenizer": "tokenizer",
    "vlm.data.gpt2_tokenizer.CausalLMTokenizer": "tokenizer",
    "vlm.data.gpt2_tokenizer.FlamingoTokenizer": "tokenizer",
    "vlm.tasks.contrastive.ContrastiveTask": "task",
    "vlm.tasks.language.LanguageModelTask": "task",
    "vlm.tasks.captioning.FlamingoTask": "task",
}
# Modules whose classes of one base a file may build, by role: the contrastive losses (a new loss is a class in
# vlm/losses.py and nothing else). Checked by name first, then, once vlm's own module is imported, by base class.
BUILDABLE_MODULES: dict[str, tuple[str, str]] = {"vlm.losses": ("loss", "ContrastiveLoss")}
NESTED_ROLES = ("model", "tokenizer", "loss")  # what a task's (or a model's) arguments may build
# Arguments that name a Hugging Face model or tokenizer: from a file, None or an existing local directory.
LOCAL_DIRECTORY_ARGS = {"name_or_path"}
# Settings whose size costs memory per input, with bounds far above any real model's.
BOUNDS: dict[str, tuple[int, int]] = {
    "context_length": (1, 1 << 16),
    "image_size": (1, 4096),
    "max_new_tokens": (1, 4096),
    "num_beams": (1, 64),
    "images_per_sequence": (1, 256),
}
# Arguments set when the weights come from the file itself: a Hugging Face part is then built from its local
# config alone (no second copy of the weights read from its directory, and nothing loaded on the meta device).
WEIGHTS_FROM_FILE = {"vlm.models.hf_decoder.HFCausalLM": {"pretrained": False},
                     "vlm.models.hf_text.HFTextEncoder": {"pretrained": False}}  # fmt: skip
MAX_ITEMS = 1 << 16  # entries of any list or mapping in a config
MAX_STRING = 1 << 16  # characters of any string in a config
MAX_DEPTH = 32  # nesting of lists and mappings
MAX_NODES = 1 << 18  # values in one config in all, counting a shared reference at each place it appears
MAX_TEMPLATES = 1000


def _refuse(where: str, key: str, why: str) -> CheckpointError:
    if len(key) > 200:  # a key path built from a file's own (up to 65,536-character) names
        key = key[:100] + "..." + key[-97:]
    return CheckpointError(f"{where}: refused {key}: {why}")


def check_plain(value: Any, where: str, key: str = "config", depth: int = 0) -> None:
    """Refuses anything but bounded JSON-like data (None, bool, int, float, str, lists and string-keyed mappings).

    Every value visited counts against one budget of :data:`MAX_NODES`, shared references included: a pickle can
    refer to one list from 65,536 places on each of a few levels, which is small on disk but would take a walk of
    65,536 ** levels steps.
    """
    budget = [MAX_NODES]
    _check_plain(value, where, key, depth, budget)


def _check_plain(value: Any, where: str, key: str, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _refuse(where, key, f"more than {MAX_NODES:,} values in all (shared references count each time)")
    if depth > MAX_DEPTH:
        raise _refuse(where, key, f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > 1 << 53:
            raise _refuse(where, key, "an integer out of range (more than 2**53 in size)")
        return
    if isinstance(value, float):
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise _refuse(where, key, f"a string of {len(value):,} characters (at most {MAX_STRING:,})")
        return
    if isinstance(value, list | tuple):
        if len(value) > MAX_ITEMS:
            raise _refuse(where, key, f"a list of {len(value):,} items (at most {MAX_ITEMS:,})")
        for i, item in enumerate(value):
            _check_plain(item, where, f"{key}[{i}]", depth + 1, budget)
        return
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            raise _refuse(where, key, f"a mapping of {len(value):,} entries (at most {MAX_ITEMS:,})")
        for k, item in value.items():
            if not isinstance(k, str):
                raise _refuse(where, key, f"a mapping key of type {type(k).__name__} that is not a string")
            _check_plain(item, where, f"{key}.{k}", depth + 1, budget)
        return
    raise _refuse(where, key, f"a {type(value).__name__}, not plain config data")


def check_setting(name: str, value: Any, where: str, key: str) -> None:
    """Bounds for the settings named in :data:`BOUNDS`, and templates: exactly one plain ``{}`` each."""
    if name in BOUNDS and value is not None:
        low, high = BOUNDS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _refuse(where, key, f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if name == "templates" and value is not None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not items or len(items) > MAX_TEMPLATES:
            raise _refuse(where, key, f"templates must be a set name or a list of 1 to {MAX_TEMPLATES} prompts")
        for t in items:
            if not isinstance(t, str):
                raise _refuse(where, key, f"template {t!r} is not a string")
            if t not in TEMPLATE_SETS:
                try:
                    check_template(t)
                except ValueError as e:
                    raise _refuse(where, key, str(e)) from None
    if name in ("image_mean", "image_std") and value is not None:
        if (not isinstance(value, list | tuple) or len(value) != 3
                or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value)
                or (name == "image_std" and not all(x > 0 for x in value))):  # fmt: skip
            raise _refuse(where, key, f"{name} must be three finite numbers{' > 0' if name == 'image_std' else ''}")


def check_class_path(class_path: Any, where: str, key: str, roles: tuple[str, ...]) -> str:
    """Returns ``class_path`` if :data:`BUILDABLE` lists it under one of ``roles``; imports nothing."""
    if not isinstance(class_path, str):
        raise _refuse(where, f"{key}.class_path", f"{class_path!r} is not a class path")
    role = BUILDABLE.get(class_path)
    module_name, _, name = class_path.rpartition(".")
    if role is None and module_name in BUILDABLE_MODULES and name.isidentifier() and not name.startswith("_"):
        role = BUILDABLE_MODULES[module_name][0]
    if role is None or role not in roles:
        kinds = " or ".join(roles)
        raise _refuse(where, f"{key}.class_path", f"{class_path!r} is not one of vlm's buildable {kinds} classes")
    return class_path


def resolve_class(class_path: Any, where: str, key: str, roles: tuple[str, ...]) -> type:
    """The class ``class_path`` names, imported only if :data:`BUILDABLE` lists it under one of ``roles``."""
    check_class_path(class_path, where, key, roles)
    module_name, _, name = class_path.rpartition(".")
    module = importlib.import_module(module_name)
    cls = getattr(module, name, None)
    if module_name in BUILDABLE_MODULES and class_path not in BUILDABLE:
        base = getattr(module, BUILDABLE_MODULES[module_name][1])
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise _refuse(where, f"{key}.class_path", f"{class_path!r} is not a {base.__name__} of {module_name}")
    return cls


def _check_local_directory(value: Any, where: str, key: str) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not Path(value).is_dir():
        raise _refuse(where, key, f"{value!r} is not a local directory (a file may not name a hub model)")


def _check_init_args(cls: type, class_path: str, init_args: dict, where: str, key: str) -> None:
    params = inspect.signature(cls.__init__).parameters
    for name, value in init_args.items():
        param = params.get(name)
        if param is None or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name == "self":
            raise _refuse(where, f"{key}.init_args.{name}", f"{class_path} has no argument {name!r}")
        check_setting(name, value, where, f"{key}.init_args.{name}")
        if name in LOCAL_DIRECTORY_ARGS:
            _check_local_directory(value, where, f"{key}.init_args.{name}")


def _checked(config: Any, where: str, key: str, roles: tuple[str, ...]) -> tuple[type, dict]:
    """The class and arguments of one ``{"class_path", "init_args"}`` level, after every check of that level."""
    if not isinstance(config, dict) or "class_path" not in config:
        raise _refuse(where, key, "expected a mapping with a class_path")
    extra = set(config) - {"class_path", "init_args", "dict_kwargs"}
    if extra or config.get("dict_kwargs"):
        raise _refuse(where, key, f"unexpected entries {sorted(extra) or ['dict_kwargs']}")
    cls = resolve_class(config["class_path"], where, key, roles)
    init_args = config.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise _refuse(where, f"{key}.init_args", "init_args must be a mapping")
    _check_init_args(cls, config["class_path"], init_args, where, key)
    return cls, init_args


def _is_config(value: Any) -> bool:
    return isinstance(value, dict) and "class_path" in value


def _instantiate(config: Any, where: str, key: str, roles: tuple[str, ...], weights_in_file: bool) -> Any:
    """Builds ``{"class_path", "init_args"}`` (nested ones too: models and tokenizers) after every check."""
    cls, init_args = _checked(config, where, key, roles)
    kwargs = {name: _instantiate(value, where, f"{key}.init_args.{name}", NESTED_ROLES, weights_in_file)
              if _is_config(value) else value for name, value in init_args.items()}  # fmt: skip
    if weights_in_file:
        kwargs.update(WEIGHTS_FROM_FILE.get(config["class_path"], {}))
    return cls(**kwargs)


def check_config(config: Any, where: str, roles: tuple[str, ...], key: str = "config") -> None:
    """Every check :func:`build` makes, without building anything: for a config another library will build."""
    check_plain(config, where, key)
    _, init_args = _checked(config, where, key, roles)
    for name, value in init_args.items():
        if _is_config(value):
            check_config(value, where, NESTED_ROLES, f"{key}.init_args.{name}")


def build(config: Any, where: str, roles: tuple[str, ...], key: str = "config", weights_in_file: bool = False) -> Any:
    """Builds the object a file's config describes, refusing anything :data:`BUILDABLE` and the bounds do not allow.

    Args:
        config: ``{"class_path": ..., "init_args": {...}}`` as read from the file.
        where: the file, for messages.
        roles: what the top-level object may be (``"model"``, ``"tokenizer"``, ``"task"``); nested objects may be
            models, tokenizers and (contrastive) losses (:data:`NESTED_ROLES`).
        key: the config's key inside the file, for messages.
        weights_in_file: the weights will be copied in from the file (see :data:`WEIGHTS_FROM_FILE`).

    Raises:
        CheckpointError: ``"<where>: refused <key>: <why>"`` for a refused class, argument or value, or
            ``"<where>: <key> does not build: <why>"`` when the constructor itself rejects the arguments.
    """
    check_plain(config, where, key)
    try:
        return _instantiate(config, where, key, roles, weights_in_file)
    except CheckpointError:
        raise
    except Exception as e:  # a constructor rejecting its (already checked, plain) arguments
        detail = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{where}: {key} does not build: {type(e).__name__}: {detail}") from None


# ------------------------------------------------------------------------------------------------ weights
@contextlib.contextmanager
def _bounded_meta_build(max_tensors: int, max_elements: int, where: str, key: str) -> Iterator[None]:
    """Builds on the ``meta`` device, stopping as soon as more tensors or elements are registered than allowed."""
    count = {"tensors": 0, "elements": 0}

    def hook(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        count["tensors"] += 1
        count["elements"] += tensor.numel()
        if count["tensors"] > max_tensors or count["elements"] > max_elements:
            raise CheckpointError(
                f"{where}: refused {key}: the config asks for more than the {max_tensors - _SLACK_TENSORS:,} tensors "
                f"/ {max_elements - _SLACK_ELEMENTS:,} elements its weights hold"
            )

    handles = [nn.modules.module.register_module_parameter_registration_hook(hook),
               nn.modules.module.register_module_buffer_registration_hook(hook)]  # fmt: skip
    try:
        with torch.device("meta"), _no_random_init():
            yield
    finally:
        for h in handles:
            h.remove()


_RANDOM_INITS = ("normal_", "trunc_normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_")  # fmt: skip


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """``torch.nn.init``'s random initialisers do nothing: a ``meta`` tensor has no values to fill, and filling one
    goes through torch's Python reference ops, whose first call imports ``torch._dynamo`` (seconds at start-up)."""
    originals = {name: getattr(nn.init, name) for name in _RANDOM_INITS}
    for name, fn in originals.items():
        setattr(nn.init, name, _skip_on_meta(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(nn.init, name, fn)


def _skip_on_meta(init: Any) -> Any:
    """``init`` for real tensors (another thread may build a model meanwhile), nothing for ``meta`` ones."""

    def maybe(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return maybe


_SLACK_TENSORS = 64  # buffers that follow from the config (masks, caches) and are not stored
_SLACK_ELEMENTS = 1 << 22


def check_weights(expected: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], where: str,
                  what: str = "its config", error: type[Exception] = CheckpointError) -> None:
    """The one check of weights against a model: raises ``error`` unless ``shapes`` (names and shapes of the weights,
    which need not be loaded) has exactly the names and shapes of ``expected`` (the model's state dict).

    With ``expected = module.state_dict(keep_vars=True)`` a parameter tied to another (stored once, as safetensors
    does) may be missing; with a plain ``state_dict()`` every name must be there. The message names the first
    mismatched key in the model's order with both shapes, or the first missing and unexpected names.
    """
    for name, ref in expected.items():
        if name in shapes and tuple(shapes[name]) != tuple(ref.shape):
            raise error(f"{where} does not match {what}: first mismatched key {name!r} has shape "
                        f"{tuple(shapes[name])} in the file but {tuple(ref.shape)} in the model")
    present = {id(expected[k]) for k in shapes if k in expected}
    missing = [k for k in expected if k not in shapes and id(expected[k]) not in present]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise error(
            f"{where} does not match {what}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )


def build_checked(config: Any, shapes: Mapping[str, tuple[int, ...]], where: str, roles: tuple[str, ...],
                  key: str = "config") -> Any:
    """:func:`build`, but only once a ``meta``-device build bounded by ``shapes`` (the weights' names and shapes,
    read without loading them) has the same names and shapes; returns the real, randomly initialised object."""
    check_plain(config, where, key)
    max_tensors = len(shapes) + _SLACK_TENSORS
    max_elements = sum(math.prod(s) for s in shapes.values()) + _SLACK_ELEMENTS
    with _bounded_meta_build(max_tensors, max_elements, where, key):
        skeleton = build(config, where, roles, key, weights_in_file=True)
    check_weights(skeleton.state_dict(keep_vars=True), shapes, where)
    del skeleton
    return build(config, where, roles, key, weights_in_file=True)


def copy_weights(module: nn.Module, weights: Mapping[str, torch.Tensor], where: str, what: str = "its config",
                 error: type[Exception] = CheckpointError) -> nn.Module:
    """The one checked copy of weights into a model: :func:`check_weights` (every name and shape; ``error`` names
    ``where`` and ``what`` otherwise), then the copy, a tied parameter filled through its twin; returns ``module``."""
    check_weights(module.state_dict(keep_vars=True), {k: tuple(v.shape) for k, v in weights.items()}, where, what,
                  error)
    module.load_state_dict(dict(weights), strict=False)
    return module


__all__ = ["BUILDABLE", "CheckpointError", "build", "build_checked", "check_class_path", "check_config",
           "check_plain", "check_setting", "check_weights", "copy_weights", "resolve_class"]
