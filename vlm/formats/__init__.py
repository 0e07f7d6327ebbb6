"""vlm's own files: Lightning checkpoints, ``vlm export`` directories and the settings inside them.

Everything that turns the contents of a file into objects goes through :mod:`vlm.formats.build` (a closed list of
buildable classes, checked before anything is imported; bounded values; the model built on the ``meta`` device and
compared with its weights before any memory is allocated). :mod:`~vlm.formats.checkpoint` reads checkpoints,
:mod:`~vlm.formats.export` writes and reads exports, :mod:`~vlm.formats.settings` writes the inference settings and
:mod:`~vlm.formats.load` reads either kind once (:func:`read_task_file`) and builds what it holds: the model with its
inference settings (:func:`load_model`) or the whole task (:func:`load_task`).
"""

from vlm.formats.build import BUILDABLE, CheckpointError, build, build_checked, check_weights, copy_weights
from vlm.formats.checkpoint import INFERENCE_KEY, build_task, read_checkpoint, task_config
from vlm.formats.export import CONFIG_FILE, WEIGHTS_FILE, export_task, is_export, read_export_config
from vlm.formats.load import load_captioner, load_model, load_task, load_zero_shot, read_task_file
from vlm.formats.settings import caption_settings, zero_shot_settings

__all__ = [
    "BUILDABLE",
    "CONFIG_FILE",
    "CheckpointError",
    "INFERENCE_KEY",
    "WEIGHTS_FILE",
    "build",
    "build_checked",
    "build_task",
    "caption_settings",
    "check_weights",
    "copy_weights",
    "export_task",
    "is_export",
    "load_captioner",
    "load_model",
    "load_task",
    "load_zero_shot",
    "read_checkpoint",
    "read_export_config",
    "read_task_file",
    "task_config",
    "zero_shot_settings",
]
