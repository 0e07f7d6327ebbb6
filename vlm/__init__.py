"""vlm: vision-language models (ViT, CLIP, Flamingo) on PyTorch Lightning.

Models live in :mod:`vlm.models`, training tasks in :mod:`vlm.tasks`, data in :mod:`vlm.data`, weight conversion
in :mod:`vlm.interop`; :func:`vlm.formats.load_task` rebuilds any trained task from its checkpoint.
"""

__version__ = "0.1.0"
