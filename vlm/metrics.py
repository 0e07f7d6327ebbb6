"""Validation metrics of the contrastive task: image-text retrieval recall (one caption per image, or several: the
COCO / Flickr30k protocol) and zero-shot classification accuracy. Pure functions of embeddings and logits; the task
gathers them across ranks and logs what these return.
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


def multi_caption_recall(image: Tensor, text: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                         chunk: int = 1024) -> dict[str, float]:
    """Image->text and text->image recall@k when each image has one or more captions (the COCO / Flickr30k protocol).

    Image->text: an image is a hit when ANY of its captions is among its ``k`` most similar captions. Text->image: a
    caption is a hit when ITS image is among its ``k`` most similar images. Ties within 1e-6 count in the true
    match's favour, as in :func:`retrieval_recall`, which this equals when every image has exactly one caption.
    Similarities are computed ``chunk`` rows at a time, so memory stays bounded for large galleries.

    Args:
        image: (n, d) image embeddings.
        text: (m, d) caption embeddings.
        text_to_image: (m,) the index of each caption's image; every image must have at least one caption.
        ks: the cut-offs.
        chunk: rows of the similarity matrix held at once.

    Raises:
        ValueError: mismatched shapes, an index out of range, or an image without a caption.
    """
    n, m = image.shape[0], text.shape[0]
    t2i = text_to_image.to(device=image.device, dtype=torch.long)
    if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1] or t2i.shape != (m,):
        raise ValueError(f"expected image (n, d), text (m, d) and text_to_image (m,), got {tuple(image.shape)}, "
                         f"{tuple(text.shape)} and {tuple(t2i.shape)}")
    if m and (t2i.min() < 0 or t2i.max() >= n):
        raise ValueError(f"text_to_image holds an index outside 0..{n - 1}")
    if n == 0 or torch.bincount(t2i, minlength=n).min() == 0:
        raise ValueError("every image needs at least one caption")
    ranks = {"image_to_text": [], "text_to_image": []}
    for start in range(0, n, chunk):  # image -> text: rank of the best of the image's own captions
        sim = image[start:start + chunk] @ text.T  # (c, m)
        own = t2i.unsqueeze(0) == torch.arange(start, start + sim.shape[0], device=image.device).unsqueeze(1)
        best = sim.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        ranks["image_to_text"].append((sim > best + 1e-6).sum(dim=1))
    for start in range(0, m, chunk):  # text -> image: rank of the caption's own image
        sim = text[start:start + chunk] @ image.T  # (c, n)
        true = sim.gather(1, t2i[start:start + chunk].unsqueeze(1))
        ranks["text_to_image"].append((sim > true + 1e-6).sum(dim=1))
    out = {}
    for name, parts in ranks.items():
        rank = torch.cat(parts)
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


__all__ = ["multi_caption_recall", "retrieval_recall", "zero_shot_accuracy"]
