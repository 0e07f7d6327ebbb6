"""``vlm export``: a task's weights as safetensors plus its constructor config, loadable with no pickle involved.

An export directory holds two files:

- ``model.safetensors``: the task's state dict (tensors only; shared tensors such as tied embeddings stored once);
- ``config.json``: the task's constructor config ``{"class_path": ..., "init_args": {...}}``, exactly the
  hyper-parameters LightningCLI saved (nested models and tokenizers are ``class_path`` dicts too), plus, for a task
  that has them (``inference_settings()``), the resolved settings inference needs under ``"inference"``.

Reading one checks the config through :mod:`vlm.formats.build` against the safetensors *header* (names and shapes)
before any tensor is read, so a directory from an untrusted source can at worst hold wrong numbers, never code.
Writing one is atomic: both files are written under temporary names in the target directory and renamed into place,
and a destination that is a symbolic link is refused rather than written through.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from vlm.data.files import UnsafeFileError, check_regular, read_text_bounded
from vlm.formats.build import CheckpointError
from vlm.formats.checkpoint import INFERENCE_KEY, task_config

if TYPE_CHECKING:
    from lightning import LightningModule

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONFIG_LIMIT = 16 << 20  # bytes of config.json


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON-ready data; anything else (a module, a tensor) means the task was not built from a config."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise CheckpointError(
        f"the task's hyper-parameter {where} is a {type(value).__name__}, not plain config data: build the task "
        "from a config (vlm fit, or vlm.formats.build_task) so it can be exported"
    )


def export_task(task: LightningModule, out_dir: str | Path) -> Path:
    """Writes ``task`` as ``out_dir/model.safetensors`` + ``out_dir/config.json``, atomically; returns ``out_dir``.

    Raises:
        CheckpointError: the task's hyper-parameters are not a ``class_path`` config (it was built by hand), or
            ``out_dir`` (or a file in it) is a symbolic link or not a directory.
    """
    from safetensors.torch import save_model

    config = _plain(task_config(dict(task.hparams)), "config")
    settings = task.inference_settings() if hasattr(task, "inference_settings") else None
    if settings is not None:
        config[INFERENCE_KEY] = _plain(settings, INFERENCE_KEY)
    out = Path(out_dir)
    if out.is_symlink():
        raise CheckpointError(f"refusing to write through {out}: it is a symbolic link")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if (out / name).is_symlink():
            raise CheckpointError(f"refusing to write through {out / name}: it is a symbolic link")
    out.mkdir(parents=True, exist_ok=True)
    weights = _temporary(out, WEIGHTS_FILE)
    text = _temporary(out, CONFIG_FILE)
    try:
        save_model(task, str(weights), metadata={"format": "pt", "class_path": config["class_path"]})
        text.write_text(json.dumps(config, indent=2) + "\n")
        for tmp in (weights, text):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(weights, out / WEIGHTS_FILE)  # rename replaces a link at the name; it never writes through one
        os.replace(text, out / CONFIG_FILE)
    finally:
        weights.unlink(missing_ok=True)
        text.unlink(missing_ok=True)
    return out


def _temporary(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp-{name}-")
    os.close(fd)
    os.chmod(tmp, 0o644)
    return Path(tmp)


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a ``config.json`` (the mark of a ``vlm export``)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).exists()


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The config of an export directory (bounded in size, regular files only, JSON with a task ``class_path``)."""
    path = Path(path)
    try:
        check_regular(path / WEIGHTS_FILE, "export weights")
        raw = read_text_bounded(path / CONFIG_FILE, "export config", CONFIG_LIMIT)
    except UnsafeFileError as e:
        raise CheckpointError(f"{path} is not a readable vlm export directory: {e}") from None
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer of more than 4,300 digits
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
        raise CheckpointError(f"{path / CONFIG_FILE} has no task class_path")
    if not isinstance(config.get("init_args", {}), dict):
        raise CheckpointError(f"{path / CONFIG_FILE}: refused init_args: not a mapping")
    return config


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an export's tensors, from the safetensors header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    file = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def read_export_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an export directory's ``model.safetensors``."""
    return read_safetensors(Path(path) / WEIGHTS_FILE)


def read_safetensors(file: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file (a format that holds tensors only: nothing in it can run).

    Raises:
        CheckpointError: naming the file, when it is not a readable safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "export_task", "is_export", "read_export_config",
           "read_export_weights", "read_safetensors", "weight_shapes"]
