"""``vlm export``: a task's weights as safetensors plus its constructor config, loadable with no pickle involved.

An export directory holds two files:

- ``model.safetensors``: the task's state dict (tensors only; shared tensors such as tied embeddings stored once);
- ``config.json``: the task's constructor config ``{"class_path": ..., "init_args": {...}}``, exactly the
  hyper-parameters LightningCLI saved (nested models and tokenizers are ``class_path`` dicts too), plus, for a task
  that has them (``inference_settings()``), the resolved settings inference needs under ``"inference"`` (what lets
  :func:`vlm.inference.load_zero_shot` load it without Lightning).

:func:`load_exported` rebuilds the task from the config (``vlm.checkpoint.build_task``: only vlm task classes) and
copies the weights, so a directory from an untrusted source can at worst hold wrong numbers, never code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from vlm.checkpoint import CheckpointError, build_task, load_task, task_config

if TYPE_CHECKING:  # reading an export does not need Lightning; building its task does (build_task imports it)
    from lightning import LightningModule

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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
        "from a config (vlm fit, or vlm.checkpoint.build_task) so it can be exported"
    )


def export_task(task: LightningModule, out_dir: str | Path) -> Path:
    """Writes ``task`` as ``out_dir/model.safetensors`` + ``out_dir/config.json``; returns ``out_dir``.

    Raises:
        CheckpointError: the task's hyper-parameters are not a ``class_path`` config (it was built by hand).
    """
    from safetensors.torch import save_model

    config = _plain(task_config(dict(task.hparams)), "config")
    settings = task.inference_settings() if hasattr(task, "inference_settings") else None
    if settings is not None:
        config["inference"] = _plain(settings, "inference")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(task, str(out / WEIGHTS_FILE), metadata={"format": "pt", "class_path": config["class_path"]})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The ``{"class_path", "init_args"}`` config of an export directory."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} is not a vlm export directory (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
        raise CheckpointError(f"{path / CONFIG_FILE} has no task class_path")
    if not isinstance(config.get("init_args", {}), dict):
        raise CheckpointError(f"{path / CONFIG_FILE}: init_args must be a mapping")
    return config


def load_exported(path: str | Path) -> LightningModule:
    """Rebuilds the task saved by :func:`export_task` (safetensors + JSON, no pickle), in eval mode.

    Raises:
        CheckpointError: missing or unreadable files, a task class outside vlm, or weights that do not fit the
            config (the first mismatched key and both shapes are named).
    """
    path = Path(path)
    config = read_export_config(path)
    weights = read_export_weights(path)
    task = build_task(config)
    copy_weights(task, weights, path)
    return task.eval()


def read_export_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an export directory's ``model.safetensors``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {e}") from None


def copy_weights(module: nn.Module, weights: dict[str, Tensor], path: str | Path, source: str = WEIGHTS_FILE) -> None:
    """Copies ``weights`` (read from ``source`` of ``path``) into ``module``; every key must match a tensor of the
    same shape and none may be missing (except tied parameters, which safetensors stores once).

    Raises:
        CheckpointError: the first mismatched key and both shapes, or the missing / unexpected keys.
    """
    expected = module.state_dict()
    for key, ref in expected.items():  # in the model's order, so "first" is stable
        if key in weights and tuple(weights[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path} does not match its config: first mismatched key {key!r} has shape "
                f"{tuple(weights[key].shape)} in {source} but {tuple(ref.shape)} in the model"
            )
    missing, unexpected = module.load_state_dict(weights, strict=False)
    # Tied parameters are stored once (safetensors refuses shared tensors): a missing name whose storage is
    # shared with a loaded one was filled through it.
    loaded = {expected[k].data_ptr() for k in weights if k in expected}
    missing = [k for k in missing if expected[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )


def main(argv: list[str] | None = None) -> int:
    """``vlm export --checkpoint CKPT --out DIR``; returns the exit code (1 for a bad checkpoint, 2 for usage)."""
    parser = argparse.ArgumentParser(
        prog="vlm export",
        description="Write a task's weights as model.safetensors plus its constructor config (config.json).",
    )
    parser.add_argument("--checkpoint", required=True, help="a Lightning checkpoint (.ckpt) or an export directory")
    parser.add_argument("--out", required=True, help="output directory")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage message
        return int(e.code or 0)
    try:
        task = load_task(args.checkpoint)
        out = export_task(task, args.out)
    except (CheckpointError, OSError) as e:
        print(f"vlm export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out / WEIGHTS_FILE} and {out / CONFIG_FILE} ({type(task).__name__})")
    return 0


__all__ = ["export_task", "load_exported", "main", "read_export_config"]
