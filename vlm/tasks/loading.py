"""``Task.load_from_checkpoint`` through vlm's file checks instead of Lightning's instantiation.

Lightning's own ``load_from_checkpoint`` rebuilds a LightningCLI-trained module by importing and calling whatever
the checkpoint's ``_instantiator`` and ``class_path`` entries name. vlm's tasks replace it with
:func:`vlm.formats.load_task`, so the familiar call gets the same allow-list, bounds and weight checks as every
other way of loading a vlm file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("vlm.tasks")


class CheckedLoading:
    """Mixin for vlm's LightningModules: a checked ``load_from_checkpoint``, and an earlier vlm's weight names
    brought up to date when a run resumes."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, **kwargs: Any):
        """The task saved in ``checkpoint_path`` (a ``.ckpt`` or a ``vlm export`` directory), in eval mode.

        Raises:
            CheckpointError: the file is refused, of another task class, or does not match its config.
            ValueError: ``hparams_file`` or hyper-parameter overrides, which vlm files do not take: change the config
                and build the task with :func:`vlm.formats.build_task` instead.
        """
        from vlm.formats.load import load_task

        if hparams_file is not None or kwargs or strict is False:
            raise ValueError("vlm tasks load from their own config and weights only (no hparams_file, overrides or "
                             "strict=False): edit the config and use vlm.formats.build_task")
        task = load_task(checkpoint_path, expected=f"{cls.__module__}.{cls.__qualname__}")
        if isinstance(map_location, str | torch.device):
            task = task.to(map_location)
        return task

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint an earlier vlm wrote resumes under today's weight names (Lightning calls this before it
        loads the state dict; see :func:`vlm.formats.checkpoint.current_weight_names`)."""
        from vlm.formats.checkpoint import current_weight_names

        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = current_weight_names(checkpoint["state_dict"])


def load_init_weights(model: nn.Module, source: str, prefix: str, what: str) -> None:
    """Copies the weights under ``prefix`` in the checkpoint or state dict ``source`` into ``model`` (every key
    and shape checked; ``what`` names the model in errors). An open_clip CLIP checkpoint (``.pt``, ``.bin`` or
    ``.safetensors`` of an open_clip model, OpenAI's layout included) is converted to vlm's names first
    (:func:`vlm.interop.load_weights`), whatever ``prefix``: the config must describe the same architecture.

    Raises:
        WeightsSourceError: the file is refused, has nothing under ``prefix``, or does not match the model.
    """
    from vlm.formats.checkpoint import current_weight_name
    from vlm.interop import load_weights
    from vlm.interop.open_clip_files import is_open_clip_state_dict
    from vlm.interop.weights import ConversionError, WeightsSourceError, load_checked, read_state_dict, sub_state_dict

    try:
        state = read_state_dict(source)
        if is_open_clip_state_dict(state):
            load_weights(model, state)
            log.info("%s starts from the open_clip weights in %s", what, source)
            return
        part = sub_state_dict(state, current_weight_name(prefix))  # an earlier vlm's prefix names the same part
        if not part:
            raise ConversionError(f"no weights under the prefix {prefix!r} (set init_weights_prefix)")
        load_checked(model, part, what)
    except ConversionError as e:
        raise WeightsSourceError(f"cannot start from init_weights={source!r}: {e}. Train the run it comes from "
                                 f"first (see the config's header) or point init_weights elsewhere.") from None
    log.info("%s starts from %s", what, source)


__all__ = ["CheckedLoading", "load_init_weights"]
