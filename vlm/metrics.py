"""Validation metrics of the contrastive task: image-text retrieval recall and zero-shot classification accuracy.
Pure functions of embeddings and logits; the task gathers them across ranks and logs what these return.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy


def retrieval_recall(image: Tensor, text: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image->text and text->image recall@k when row i of ``image`` matches row i of ``text``.

    A caption may be shared by several images (synthetic data): a retrieved item counts as correct when its
    embedding equals the true one's, so identical captions are not penalised against each other.
    """
    sim = image @ text.T  # (n, n)
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        true = s.diagonal().unsqueeze(1)
        rank = (s > true + 1e-6).sum(dim=1)  # gallery items strictly more similar than the true match
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return out


def zero_shot_accuracy(logits: Tensor, target: Tensor, classnames: list[str], heldout: set[str]) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy over all labelled images, and top-1 on the held-out classes alone.

    Args:
        logits: (n, classes) image-class scores.
        target: (n,) class index of each image, -1 for an image whose label is not one of ``classnames``.
        classnames: the classes, in ``logits``' column order.
        heldout: classes never seen in training; their share and the others' are reported apart.
    """
    valid = target >= 0
    logits, target = logits[valid], target[valid]
    if target.numel() == 0:
        return {}
    n = logits.shape[1]
    out = {
        f"zero_shot_top{k}": multiclass_accuracy(logits, target, n, top_k=k, average="micro").item()
        for k in (1, 5)
        if k <= n
    }
    hit1 = logits.argmax(dim=1) == target
    if heldout:
        is_heldout = torch.tensor([classnames[t] in heldout for t in target.tolist()], device=target.device)
        if is_heldout.any():
            out["zero_shot_top1_heldout"] = hit1[is_heldout].float().mean().item()
        if (~is_heldout).any():
            out["zero_shot_top1_seen"] = hit1[~is_heldout].float().mean().item()
    return out


__all__ = ["retrieval_recall", "zero_shot_accuracy"]
