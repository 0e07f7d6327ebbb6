"""What ``vlm fit --ckpt_path`` takes from a checkpoint: weights and loop state, never configuration; and the checks
of the file before Lightning reads it (:func:`check_checkpoint_file`, :func:`check_resume_weights`).

LightningCLI would merge the task config a checkpoint records into the run's config and hand it to jsonargparse,
which imports and builds what it names; a ``compile`` dict there reaches TorchInductor, whose options name a compiler
command. vlm reads the file through :func:`vlm.formats.checkpoint.read_archive` (every bound of a checkpoint read),
checks the recorded config against the allow-list without building it, and only reports how it differs from the
run's own config (:func:`config_differences`).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import torch

from vlm.data.files import UnsafeFileError, check_regular
from vlm.formats.build import CheckpointError, check_config, check_plain, check_weights
from vlm.formats.checkpoint import current_weight_names, legacy_arguments, read_archive, task_config

# vlm's own optimizer and schedule, allowed in a --ckpt_path's config beside torch's (see check_training_callable)
VLM_TRAINING_CALLABLES = {"optimizer": "vlm.tasks.optim.AdamW", "lr_scheduler": "vlm.tasks.optim.WarmupCosine"}


class Refusal(CheckpointError):
    """A refusal whose message is already whole (raised and re-raised as a plain CheckpointError)."""


def read_resume_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a ``--ckpt_path`` file through :func:`vlm.formats.checkpoint.read_archive` (regular file, uncompressed
    members, bounded pickle and values, whole dense tensors) and checks the task config it records: vlm's allow-list
    and bounds, no earlier vlm's arguments, torch's or vlm's optimizer and schedule classes only. That config is
    never built and never merged into the run: a checkpoint resumes weights and loop state, not configuration.

    Raises:
        CheckpointError: ``"cannot resume from --ckpt_path ..."``, naming the file and what is wrong with it.
    """
    try:
        ckpt = read_archive(path, "checkpoint (--ckpt_path)")
        if not isinstance(ckpt, dict) or "pytorch-lightning_version" not in ckpt:  # Lightning needs it
            raise Refusal(f"cannot resume from --ckpt_path {path}: not a Lightning training checkpoint")
        hparams = ckpt.get("hyper_parameters") or {}
        check_plain(hparams, str(path), "hyper_parameters")
        if isinstance(hparams, dict) and "_class_path" in hparams:
            legacy = legacy_arguments(hparams)
            if legacy:
                task = str(hparams["_class_path"]).rpartition(".")[2]
                raise Refusal(
                    f"cannot resume from --ckpt_path {path}: it was written by an earlier vlm whose {task} took "
                    f"{', '.join(legacy)}; tasks now take optimizer / lr_scheduler (and a tokenizer config). It still "
                    "loads for inference (vlm.load); to train on, start a new run")
            check_config(task_config(hparams, str(path)), str(path), ("task",))  # without the training-only ones
            for name in ("optimizer", "lr_scheduler"):
                check_training_callable(hparams.get(name), str(path), name)
    except Refusal as e:
        raise CheckpointError(str(e)) from None
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume from --ckpt_path: {e}") from None
    return ckpt


def check_checkpoint_file(path: Any) -> None:
    """Refuses a ``--ckpt_path`` that is missing, a FIFO, device or socket, or a file that is not a PyTorch archive,
    before Lightning reads anything of it. A directory is passed on (a sharded FSDP2 checkpoint), as is a remote
    ``scheme://`` path.

    Raises:
        CheckpointError: naming the path and what is wrong with it.
    """
    if not isinstance(path, str | os.PathLike) or "://" in str(path):
        return
    try:
        if check_regular(path, "checkpoint (--ckpt_path)", directory_ok=True).is_dir():
            return
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    if not zipfile.is_zipfile(path):  # safe: a regular file; torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"checkpoint (--ckpt_path) {path} is not a PyTorch checkpoint archive (corrupt or "
                              "truncated)")


def check_resume_weights(module: Any, path: str | os.PathLike) -> None:
    """Every bound of :func:`read_resume_checkpoint` on the file a strategy is about to load, then its weights'
    names and shapes against ``module``, the task this run built (read from the memory-mapped file, nothing
    copied), so that loading it costs no more than the model and the file. A module with ``strict_loading`` off is
    not compared.

    Raises:
        CheckpointError: naming the file and what does not fit.
    """
    ckpt = read_resume_checkpoint(path)
    weights = ckpt.get("state_dict")
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise CheckpointError(f"cannot resume from --ckpt_path {path}: its state_dict is not a mapping of named "
                              "tensors")
    weights = current_weight_names(weights)  # as the task's on_load_checkpoint will name them
    if module is not None and getattr(module, "strict_loading", True):
        try:
            check_weights(module.state_dict(keep_vars=True), {k: tuple(v.shape) for k, v in weights.items()},
                          str(path), "this run's model")  # fmt: skip
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume from --ckpt_path: {e}") from None


def config_differences(recorded: Any, current: Any, key: str = "", limit: int = 3) -> list[str]:
    """Up to ``limit`` settings (dotted keys, with both values) in which a checkpoint's recorded task config differs
    from this run's, for one line of notice; both are plain data."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        found: list[str] = []
        for name in sorted(recorded, key=str):  # a setting only this run has is a default the file left unsaid
            if len(found) >= limit:
                break
            if name not in current:
                found.append(f"{key}{name} (only in the file)")
            else:
                found += config_differences(recorded[name], current[name], f"{key}{name}.", limit - len(found))
        return found
    if recorded != current:
        def short(value: Any) -> str:
            text = repr(value)
            return text if len(text) <= 40 else text[:37] + "..."

        return [f"{key.rstrip('.')}: {short(recorded)} in the file, {short(current)} now"]
    return []


def check_training_callable(config: Any, where: str, key: str) -> None:
    """Refuses an ``optimizer`` / ``lr_scheduler`` config that names anything but one of torch's optimizer or
    learning-rate scheduler classes or vlm's (:mod:`vlm.tasks.optim`), or whose arguments are not plain data.

    Raises:
        CheckpointError: naming the file, the key and the refused value.
    """
    if config is None:
        return
    schedulers = torch.optim.lr_scheduler
    module, base = ((torch.optim, torch.optim.Optimizer) if key == "optimizer"
                    else (schedulers, (schedulers.LRScheduler, schedulers.ReduceLROnPlateau)))  # fmt: skip
    classes = {n: getattr(module, n, None) for n in module.__all__}
    allowed = {VLM_TRAINING_CALLABLES[key],
               *(f"{module.__name__}.{n}" for n, c in classes.items() if isinstance(c, type) and issubclass(c, base))}
    check_plain(config, where, key)
    if not isinstance(config, dict) or set(config) - {"class_path", "init_args"}:
        raise CheckpointError(f"{where}: refused {key}: expected a class_path with its init_args")
    if config.get("class_path") not in allowed or not isinstance(config.get("init_args") or {}, dict):
        raise CheckpointError(f"{where}: refused {key}.class_path: {config.get('class_path')!r} is not one of torch's "
                              f"or vlm's {key.replace('_', ' ')} classes")


__all__ = ["VLM_TRAINING_CALLABLES", "check_checkpoint_file", "check_resume_weights", "check_training_callable",
           "config_differences", "read_resume_checkpoint"]
