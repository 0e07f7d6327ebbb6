"""A compositional test of a CLIP model in the manner of SugarCrepe (Hsieh et al., 2023): hard negatives built from a
dataset's own captions and labels, and how often the model scores the true caption above them.

A caption that contains its label word for word ("a large red circle", label "red circle") is changed in one
compositional detail, so a model that scores the change as high as the caption has not understood that detail:

- **replace-attribute**: one label word replaced by another word seen at the same position in the dataset's labels
  of the same length ("a large blue circle", "a large red square");
- **swap-attribute**: in a caption naming two objects ("a red circle left of a blue square"), the first-position
  words (the attributes) of two of them exchanged ("a blue circle left of a red square"); an object is a run of
  words each seen at its position in the labels. When no caption of the dataset names two objects, the label's
  words are put in reverse order instead ("a large circle red"): a test of word order.

A negative equal to any caption of the same image is dropped. An (image, negative) pair is won when the image's
caption is more similar to the image than the negative is (by more than 1e-6: a tie, such as two texts the tokenizer
cuts to the same tokens, is lost); an image is won when it wins all its pairs.

Pure functions: strings in, strings out (:func:`hard_negatives`); similarities in, shares out
(:func:`negative_accuracy`); :func:`compositional_scores` ties them to a model's text embedding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from vlm.metrics import label_attributes
from vlm.prompts import caption_frame

NEGATIVE_TYPES = ("replace_attribute", "swap_attribute")
TIE = 1e-6  # a negative within this of the true caption's similarity wins the pair
_WORD = re.compile(r"\w[\w'-]*")  # the words of a caption that object phrases are read from


def _slots(labels: Sequence[str]) -> dict[int, list[list[str]]]:
    """For each label length of two or more words, the words seen at each position among labels of that length."""
    lengths = sorted({n for label in labels if (n := len(label.split())) >= 2}, reverse=True)
    return {n: label_attributes([lbl for lbl in labels if len(lbl.split()) == n]) for n in lengths}


def _replaced(caption: str, label: str, slots: dict[int, list[list[str]]]) -> list[str]:
    """The caption with one label word replaced by another word of the same position (none that repeats a word)."""
    frame, words = caption_frame(caption, label), label.split()
    if frame is None or len(words) not in slots:
        return []
    return [frame.format(" ".join(words[:k] + [w] + words[k + 1 :]))
            for k, seen in enumerate(slots[len(words)]) for w in seen if w not in words]  # fmt: skip


def _objects(caption: str, slots: dict[int, list[set[str]]]) -> list[list[re.Match]]:
    """The object phrases of a caption, left to right without overlap, longest label length first: runs of words
    whose word at each position was seen there in labels of that length. Each is its words' matches."""
    words, found, i = list(_WORD.finditer(caption)), [], 0
    while i < len(words):
        for n, seen in slots.items():
            run = words[i : i + n]
            if len(run) == n and all(m.group() in s for m, s in zip(run, seen)):
                found.append(run)
                i += n
                break
        else:
            i += 1
    return found


def _swapped_objects(caption: str, objects: list[list[re.Match]]) -> list[str]:
    """For each two objects of the same length, the caption with their first words exchanged."""
    out = []
    for a, pa in enumerate(objects):
        for pb in objects[a + 1 :]:
            if len(pa) != len(pb) or pa[0].group() == pb[0].group():
                continue
            x, y = pa[0], pb[0]  # x comes first in the caption
            out.append(caption[: x.start()] + y.group() + caption[x.end() : y.start()] + x.group() + caption[y.end() :])
    return out


def _reversed_label(caption: str, label: str) -> list[str]:
    frame, words = caption_frame(caption, label), label.split()
    return [] if frame is None or len(words) < 2 else [frame.format(" ".join(reversed(words)))]


def hard_negatives(captions: Sequence[str], labels: Sequence[str | None],
                   owner: Sequence[int] | None = None) -> dict[str, list[list[str]]]:
    """The hard negatives of each caption, by type (:data:`NEGATIVE_TYPES`).

    Args:
        captions: the captions.
        labels: each caption's label, a noun phrase found word for word in it ("red circle"), or None (then that
            caption gets no negatives). The labels together are the vocabulary: the words seen at each position of
            labels of each length (:func:`vlm.metrics.label_attributes`).
        owner: each caption's image (default: one image per caption). A negative equal to a caption of the same
            image (whitespace aside) is dropped.

    Returns:
        ``{type: negatives}``, where ``negatives[i]`` are caption i's, distinct, in a fixed order (whitespace
        collapsed, as :func:`vlm.prompts.caption_frame` writes captions). ``swap_attribute`` exchanges attributes
        between objects when some caption names two objects of one length, else reverses the label's words; it is
        empty for every caption when neither applies.
    """
    owner = list(range(len(captions))) if owner is None else list(owner)
    if not len(captions) == len(labels) == len(owner):
        raise ValueError(f"{len(captions)} captions, {len(labels)} labels and {len(owner)} owners")
    labels = [lbl if isinstance(lbl, str) and lbl.strip() else None for lbl in labels]
    captions = [" ".join(c.split()) for c in captions]
    slots = _slots([lbl for lbl in labels if lbl is not None])
    sets = {n: [set(words) for words in seen] for n, seen in slots.items()}
    objects = [_objects(c, sets) if lbl is not None else [] for c, lbl in zip(captions, labels)]
    between_objects = any(len({len(o) for o in found}) < len(found) for found in objects)  # two of one length
    own: dict[int, set[str]] = {}
    for c, image in zip(captions, owner):
        own.setdefault(image, set()).add(c)
    out: dict[str, list[list[str]]] = {t: [] for t in NEGATIVE_TYPES}
    for c, lbl, image, found in zip(captions, labels, owner, objects):
        replaced = _replaced(c, lbl, slots) if lbl is not None else []
        swapped = (_swapped_objects(c, found) if between_objects
                   else _reversed_label(c, lbl) if lbl is not None else [])  # fmt: skip
        for kind, texts in (("replace_attribute", replaced), ("swap_attribute", swapped)):
            out[kind].append([t for t in dict.fromkeys(texts) if t not in own[image]])
    return out


def negative_accuracy(true: Tensor, negative: Tensor, caption_of: Tensor,
                      owner: Tensor) -> dict[str, float | int] | None:
    """How often the true caption beats its negatives.

    Args:
        true: (m,) each caption's similarity to its own image.
        negative: (p,) each pair's negative's similarity to the image of the pair's caption.
        caption_of: (p,) the caption of each pair.
        owner: (m,) the image of each caption.

    Returns:
        ``{"pair_accuracy", "image_accuracy", "pairs", "images"}``: the share of pairs whose caption is more than
        :data:`TIE` more similar than the negative, the share of images (those with at least one pair) winning all
        their pairs, and the counts; None when there is no pair.
    """
    if negative.shape != caption_of.shape or negative.ndim != 1 or true.shape != owner.shape:
        raise ValueError(f"expected true and owner (m,), negative and caption_of (p,), got {tuple(true.shape)}, "
                         f"{tuple(owner.shape)}, {tuple(negative.shape)}, {tuple(caption_of.shape)}")
    if negative.numel() == 0:
        return None
    caption_of = caption_of.to(device=true.device, dtype=torch.long)
    won = true[caption_of] > negative.to(true) + TIE
    images, image_of = owner.to(true.device)[caption_of].unique(return_inverse=True)
    lost = torch.zeros(len(images), device=true.device).index_add_(0, image_of, (~won).float())
    return {"pair_accuracy": won.float().mean().item(), "image_accuracy": (lost == 0).float().mean().item(),
            "pairs": int(won.numel()), "images": len(images)}


def compositional_scores(image: Tensor, text: Tensor, owner: Tensor, captions: Sequence[str],
                         labels: Sequence[str | None], embed_texts: Callable[[list[str]], Tensor],
                         chunk: int = 4096) -> dict[str, dict[str, float | int] | None]:
    """:func:`negative_accuracy` per type of :func:`hard_negatives`, for a model's embeddings.

    Args:
        image: (n, d) unit-length image embeddings.
        text: (m, d) unit-length embeddings of ``captions``.
        owner: (m,) the image of each caption.
        captions, labels: the captions and their labels (None for a caption without one).
        embed_texts: the model's text embedding (unit length, (k, d) for k texts); each distinct negative is
            embedded once, ``chunk`` texts at a time, and only the similarities are kept.

    Returns:
        ``{type: negative_accuracy(...)}``: None for a type with no negative.
    """
    owner = owner.to(device=image.device, dtype=torch.long)
    negatives = hard_negatives(captions, labels, owner.tolist())
    true = (image[owner] * text.to(image)).sum(dim=1)
    ids: dict[str, int] = {}  # each distinct negative text, over all types
    pairs = {kind: [(i, ids.setdefault(t, len(ids))) for i, texts in enumerate(per) for t in texts]
             for kind, per in negatives.items()}  # fmt: skip
    caption_of = torch.tensor([i for p in pairs.values() for i, _ in p], dtype=torch.long, device=image.device)
    text_id = torch.tensor([j for p in pairs.values() for _, j in p], dtype=torch.long, device=image.device)
    scores, order, texts = torch.empty(len(text_id), device=image.device), text_id.argsort(), list(ids)
    bounds = torch.searchsorted(text_id[order], torch.arange(0, len(texts) + chunk, chunk, device=image.device))
    for step, start in enumerate(range(0, len(texts), chunk)):
        emb = embed_texts(texts[start : start + chunk]).to(image)
        rows = order[bounds[step] : bounds[step + 1]]  # the pairs whose negative is in this chunk
        scores[rows] = (image[owner[caption_of[rows]]] * emb[text_id[rows] - start]).sum(dim=1)
    out, at = {}, 0
    for kind, p in pairs.items():
        out[kind] = negative_accuracy(true, scores[at : at + len(p)], caption_of[at : at + len(p)], owner)
        at += len(p)
    return out


__all__ = ["NEGATIVE_TYPES", "TIE", "compositional_scores", "hard_negatives", "negative_accuracy"]
