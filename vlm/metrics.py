"""Validation metrics of the contrastive task: image-text retrieval recall (one caption per image, or several: the
COCO / Flickr30k protocol), zero-shot classification accuracy, and what a classifier's mistakes are made of: accuracy
per attribute of multi-word labels (colour right, shape right) and the confusion matrix. Pure functions of
embeddings, logits or (predicted, true) label pairs; the task gathers them across ranks and logs what these return.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


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


def zero_shot_accuracy(logits: Tensor, target: Tensor, heldout: Tensor | None = None) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy over all labelled images, and top-1 on the held-out and seen images apart.

    Args:
        logits: (n, classes) image-class scores.
        target: (n,) class index of each image, -1 for an image whose label is not one of the classes (dropped from
            every accuracy, its ``heldout`` flag too).
        heldout: (n,) bool, true for an image of a class never seen in training (the batches' ``heldout``), or None.
            Given, ``zero_shot_top1_heldout`` / ``zero_shot_top1_seen`` report the flagged / unflagged images, each
            where there are any.
    """
    # torchmetrics (and the scipy it imports) here, not at import: scripts/zero_shot.py uses this module's label
    # functions and stays light
    from torchmetrics.functional.classification import multiclass_accuracy

    if heldout is not None and heldout.shape != target.shape:
        raise ValueError(f"heldout {tuple(heldout.shape)} must have one flag per target {tuple(target.shape)}")
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
    if heldout is not None:
        is_heldout = heldout.to(device=valid.device, dtype=torch.bool)[valid]
        if is_heldout.any():
            out["zero_shot_top1_heldout"] = hit1[is_heldout].float().mean().item()
        if (~is_heldout).any():
            out["zero_shot_top1_seen"] = hit1[~is_heldout].float().mean().item()
    return out


def label_attributes(labels: Sequence[str]) -> list[list[str]]:
    """The attributes of a label set: the words found at each position of its labels of two or more words.

    ``["red circle", "blue circle", "red square"]`` -> ``[["red", "blue"], ["circle", "square"]]``: position 1 is
    the colour, position 2 the shape. Words are split on whitespace and listed in order of first appearance.

    Args:
        labels: the class names.

    Returns:
        One list of words per position; empty when no label has two or more words (nothing to break down).
    """
    attributes: list[dict[str, None]] = []  # dicts as ordered sets
    for label in labels:
        words = label.split()
        if len(words) < 2:
            continue
        for position, word in enumerate(words):
            if position == len(attributes):
                attributes.append({})
            attributes[position].setdefault(word, None)
    return [list(words) for words in attributes]


def attribute_accuracy(pairs: Iterable[tuple[str, str]], labels: Sequence[str]) -> list[dict[str, object]]:
    """Accuracy per attribute: how often the predicted label has the true label's word at each word position.

    With labels "colour shape", an image of a "red circle" predicted "red square" has its colour right and its
    shape wrong. An image counts towards position ``i`` when its true label has two or more words and a word at
    ``i``; a predicted label without a word there is wrong at ``i``.

    Args:
        pairs: ``(predicted label, true label)`` for each image.
        labels: the label set, which gives the attributes (:func:`label_attributes`).

    Returns:
        Per word position, in order: ``{"attribute": "attribute 1", "values": [words],
        "correct": int, "total": int, "accuracy": float}`` (accuracy 0.0 when no image counted). Empty when no
        label has two or more words.
    """
    attributes = label_attributes(labels)
    correct, total = [0] * len(attributes), [0] * len(attributes)
    for predicted, true in pairs:
        truth, guess = true.split(), predicted.split()
        if len(truth) < 2:
            continue
        for position, word in enumerate(truth[: len(attributes)]):
            total[position] += 1
            correct[position] += position < len(guess) and guess[position] == word
    return [
        {"attribute": f"attribute {i + 1}", "values": values, "correct": correct[i], "total": total[i],
         "accuracy": correct[i] / total[i] if total[i] else 0.0}
        for i, values in enumerate(attributes)
    ]  # fmt: skip


def attribute_top1(logits: Tensor, target: Tensor, classnames: Sequence[str]) -> dict[str, float]:
    """Top-1 accuracy per attribute of multi-word class names, as the contrastive task logs it on validation.

    ``attribute{k}_top1`` (k from 1) is the share of the labelled images whose top-1 class has the true class's word
    at position k (with "colour shape" names: the colour right, the shape right), by :func:`attribute_accuracy`.

    Args:
        logits: (n, classes) image-class scores.
        target: (n,) class index of each image, -1 for an image whose label is not one of ``classnames`` (left out).
        classnames: the classes, in ``logits``' column order.

    Returns:
        One value per word position that some labelled image's class has; empty when no class name has two or more
        words.
    """
    valid = target >= 0
    predicted, true = logits[valid].argmax(dim=1).tolist(), target[valid].tolist()
    pairs = [(classnames[p], classnames[t]) for p, t in zip(predicted, true)]
    return {f"attribute{i + 1}_top1": a["accuracy"] for i, a in enumerate(attribute_accuracy(pairs, classnames))
            if a["total"]}  # fmt: skip


def confusion_matrix(pairs: Iterable[tuple[str, str]], labels: Sequence[str]) -> list[list[int]]:
    """Counts of (true, predicted) label pairs: row = true label, column = predicted label, in ``labels``' order.

    Args:
        pairs: ``(predicted label, true label)`` for each image; a pair naming a label outside ``labels`` is left
            out (it has no row or column).
        labels: the label set, in the order of the rows and columns.

    Returns:
        A ``len(labels)`` x ``len(labels)`` list of lists of counts; the diagonal holds the correct predictions.
    """
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for predicted, true in pairs:
        if predicted in index and true in index:
            matrix[index[true]][index[predicted]] += 1
    return matrix


__all__ = [
    "attribute_accuracy",
    "attribute_top1",
    "confusion_matrix",
    "label_attributes",
    "multi_caption_recall",
    "retrieval_recall",
    "zero_shot_accuracy",
]
