"""Hugging Face parts from a local directory, read as data: no remote code, no Hub kernel, no prompt.

A directory that a vlm file or a config names (``name_or_path``) holds a stranger's ``config.json`` and
``tokenizer_config.json``. ``transformers`` would act on some of their entries: ``auto_map`` names Python code in the
directory (without ``trust_remote_code`` it asks on the terminal whether to run it), ``attn_implementation`` may name
a Hub kernel that it downloads and imports, and a ``dtype`` string is looked up on ``torch`` (so ``"_dynamo"``
imports a module). :func:`check_local_dir` reads those two files (regular files only, size-bounded) and refuses such
entries before ``transformers`` sees the directory; every ``from_pretrained`` / ``from_config`` call in vlm also
passes ``trust_remote_code=False``, so nothing ever reads stdin.

The Rust ``tokenizers`` library ends some failures (a pathological regex in a ``tokenizer.json`` that runs out of its
backtracking budget) in a panic, which reaches Python as ``pyo3_runtime.PanicException``, a ``BaseException``. The
:func:`rust_panics` context turns it into :class:`HFFileError`, a ``ValueError``, so callers report one line.

This module lives with the models because both the text towers and the tokenizers (on the data floor above) use it;
it reads with the same rules as :mod:`vlm.data.files` (which the models floor cannot import).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

HF_FILE_LIMIT = 16 << 20  # a config.json or tokenizer_config.json: far above any real one
CONFIG_FILES = ("config.json", "tokenizer_config.json")
# Parameter dtypes a decoder may be loaded in, by the names vlm accepts (torch's own names and the usual short ones).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
# dtype strings a config.json may hold (transformers looks them up on torch itself).
CONFIG_DTYPES = ("float32", "float16", "bfloat16", "float64")
_PSEUDO_ROOTS = ("/proc", "/sys", "/dev")
_MAX_DEPTH = 64


class HFFileError(ValueError):
    """A Hugging Face directory or tokenizer vlm refuses or cannot use; the message names the file and the entry."""


def attn_implementations() -> tuple[str | None, ...]:
    """The attention implementations a decoder may ask for: transformers' built-in ones. ``flash_attention_2`` only
    where the ``flash_attn`` package is installed: without it transformers would fetch a kernel from the Hub."""
    extra = ("flash_attention_2",) if importlib.util.find_spec("flash_attn") is not None else ()
    return (None, "eager", "sdpa", *extra)


def check_attn_implementation(value: Any, where: str) -> str | None:
    """``value`` if it is one of :func:`attn_implementations`, else :class:`HFFileError` naming ``where``."""
    allowed = attn_implementations()
    if not (value is None or (isinstance(value, str) and value in allowed)):
        names = ", ".join(repr(a) for a in allowed)
        raise HFFileError(f"{where}: attn_implementation {value!r} is not one of {names} (a Hub kernel is never "
                          "fetched)")
    return value


def torch_dtype(name: Any, where: str = "dtype") -> torch.dtype:
    """The ``torch.dtype`` that ``name`` (one of :data:`DTYPES`, or ``None`` for float32) names; any other value is
    refused before anything is looked up on ``torch``."""
    if name is None:
        return torch.float32
    if not isinstance(name, str) or name not in DTYPES:
        raise HFFileError(f"{where}: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_json_bounded(path: Path, limit: int = HF_FILE_LIMIT) -> Any:
    """The JSON value in the regular file ``path`` (at most ``limit`` bytes); FIFOs, devices and files under
    ``/proc``, ``/sys`` or ``/dev`` are refused, and the file is opened without blocking."""
    real = os.path.realpath(path)
    if any(real == root or real.startswith(root + "/") for root in _PSEUDO_ROOTS):
        raise HFFileError(f"{path} resolves to {real}, a system pseudo-file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise HFFileError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise HFFileError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise HFFileError(f"{path} is {info.st_size:,} bytes, over the {limit:,}-byte limit")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise HFFileError(f"{path} is over the {limit:,}-byte limit")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # malformed, not UTF-8, over-long integers, nested without end
        raise HFFileError(f"{path} is not valid JSON ({type(e).__name__})") from None


def _entries(value: Any, key: str = "", depth: int = 0) -> Iterator[tuple[str, str, Any]]:
    """Every ``(dotted key, last key, value)`` of the mappings inside ``value``, nested ones included."""
    if depth > _MAX_DEPTH:
        raise HFFileError(f"nested deeper than {_MAX_DEPTH} levels at {key or 'the top'}")
    if isinstance(value, dict):
        for k, v in value.items():
            dotted = f"{key}.{k}" if key else str(k)
            yield dotted, str(k), v
            yield from _entries(v, dotted, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _entries(v, f"{key}[{i}]", depth + 1)


def _check_tokenizer_class(name: Any, where: str) -> None:
    """``tokenizer_class`` must name one of transformers' tokenizer classes (transformers resolves any attribute of
    its package by this name)."""
    if not isinstance(name, str) or not name.isidentifier() or not name.endswith(("Tokenizer", "TokenizerFast",
                                                                                 "Backend")):
        raise HFFileError(f"{where}: tokenizer_class {name!r} is not a transformers tokenizer class")
    import transformers
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    for candidate in (name, name.removesuffix("Fast")):
        cls = getattr(transformers, candidate, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase):
            return
    raise HFFileError(f"{where}: tokenizer_class {name!r} is not a transformers tokenizer class")


def check_local_dir(name_or_path: str | os.PathLike | None) -> None:
    """Refuses a local Hugging Face directory whose ``config.json`` or ``tokenizer_config.json`` would make
    transformers run, import or fetch code: ``auto_map`` (anywhere), an unknown ``model_type``, a ``tokenizer_class``
    that is not a transformers tokenizer, an ``attn_implementation`` outside :func:`attn_implementations`, or a
    ``dtype`` / ``torch_dtype`` outside :data:`CONFIG_DTYPES`. ``None`` and names that are not local directories (hub
    names, for users who have the Hub) pass unchecked.

    Raises:
        HFFileError: naming the file and the entry.
    """
    if name_or_path is None or not Path(name_or_path).is_dir():
        return
    for name in CONFIG_FILES:
        path = Path(name_or_path) / name
        if not os.path.lexists(path):
            continue
        config = read_json_bounded(path)
        if not isinstance(config, dict):
            raise HFFileError(f"{path} is not a JSON object")
        for dotted, key, value in _entries(config):
            if key == "auto_map":
                raise HFFileError(f"{path}: refused {dotted}: it names the directory's own Python code, which vlm "
                                  "never runs")
            if key == "attn_implementation":
                check_attn_implementation(value, f"{path}: refused {dotted}")
            if key in ("dtype", "torch_dtype") and value is not None and value not in CONFIG_DTYPES:
                raise HFFileError(f"{path}: refused {dotted}: {value!r} is not one of {', '.join(CONFIG_DTYPES)}")
        if name == "config.json":
            from transformers import CONFIG_MAPPING

            model_type = config.get("model_type")
            if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
                raise HFFileError(f"{path}: refused model_type: {model_type!r} is not a model type transformers "
                                  "knows (custom model code is never run)")
        elif "tokenizer_class" in config and config["tokenizer_class"] is not None:
            _check_tokenizer_class(config["tokenizer_class"], f"{path}: refused tokenizer_class")


def _is_panic(error: BaseException) -> bool:
    # pyo3 raises its PanicException from a module it never registers, so the class is known by its full name only.
    kind = type(error)
    return kind.__module__ == "pyo3_runtime" and kind.__name__ == "PanicException"


@contextlib.contextmanager
def rust_panics(what: str) -> Iterator[None]:
    """Turns a panic of a Rust extension (``tokenizers``) inside the block into :class:`HFFileError` ``"<what>:
    <message>"``; every other exception passes unchanged."""
    try:
        yield
    except BaseException as e:
        if not _is_panic(e):
            raise
        detail = (str(e).splitlines() or ["a Rust panic"])[0]
        raise HFFileError(f"{what}: the tokenizers library failed ({detail})") from None


def load_auto_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)`` after :func:`check_local_dir`; any
    failure of the load (a malformed file, a regex the Rust library rejects or panics on) is one
    :class:`HFFileError` naming the directory."""
    check_local_dir(name_or_path)
    from transformers import AutoTokenizer

    try:
        with rust_panics(f"tokenizer {name_or_path}"):
            return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except HFFileError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many kinds for a bad file
        detail = (str(e).splitlines() or [""])[0]
        raise HFFileError(f"cannot load the tokenizer in {name_or_path}: {type(e).__name__}: {detail}") from None


__all__ = ["CONFIG_DTYPES", "DTYPES", "HFFileError", "attn_implementations", "check_attn_implementation",
           "check_local_dir", "load_auto_tokenizer", "read_json_bounded", "rust_panics", "torch_dtype"]
