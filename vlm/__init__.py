"""vlm: vision-language models (ViT, CLIP, Flamingo) on PyTorch Lightning.

``vlm.load(source)`` gives a trained model ready to classify, embed or caption (:mod:`vlm.inference`). Models live
in :mod:`vlm.models`, training tasks in :mod:`vlm.tasks`, data in :mod:`vlm.data`, vlm's own files in
:mod:`vlm.formats`, weight conversion in :mod:`vlm.interop`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from vlm.inference import Predictor

__version__ = "0.1.0"


def load(source: str | os.PathLike, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
         batch_size: int = 32) -> Predictor:
    """A trained model with its preprocessing: ``vlm.load("runs/clip/checkpoints/last.ckpt").classify(...)``.

    See :func:`vlm.inference.load`; imported on first use, so ``import vlm`` stays cheap.
    """
    from vlm.inference import load as load_model

    return load_model(source, weights=weights, device=device, batch_size=batch_size)


__all__ = ["__version__", "load"]
