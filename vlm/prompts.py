"""Prompts and compositional supervision derived from a dataset's own captions and labels.

A caption that contains its label word for word ("a large teal triangle" with label "teal triangle") is the label
in a *frame* ("a large {}"). The frames give zero-shot prompts in the training captions' own wording
(:func:`derive_templates`), and the label's words, each put alone in its caption's frame, give the caption's
*attribute phrases* ("a large teal", "a large triangle"): texts that name one attribute of the image and hold
whenever the caption does, which :class:`~vlm.tasks.contrastive.ContrastiveTask` uses as extra positives
(``attribute_positives``). Recombining label words position by position ("teal" from one label, "square" from
another) gives captions of pairs no image shows; :func:`recombined_captions` lists them with their phrases for a
text-only term that ties a caption's embedding to its phrases' (``compose_text``), so an unseen pair's caption is
built from parts the images trained.

Pure functions of strings: no model, no tokenizer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_TEMPLATES = ("a {}",)


def caption_frame(caption: str, label: str) -> str | None:
    """The caption with its label replaced by ``{}`` ("a large {}"), or None when the label is empty or not in the
    caption as whole words. Literal braces in the caption are escaped (``{{``, ``}}``)."""
    caption, label = " ".join(caption.split()), " ".join(label.split())
    if not label:
        return None
    match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", caption)
    if match is None:
        return None
    before, after = caption[: match.start()], caption[match.end() :]
    return before.replace("{", "{{").replace("}", "}}") + "{}" + after.replace("{", "{{").replace("}", "}}")


def derive_templates(
    captions: Sequence[str], labels: Sequence[str], max_templates: int = 8, min_share: float = 0.02
) -> list[str]:
    """Zero-shot prompt templates in the training captions' own frames, most frequent first.

    Args:
        captions: the training captions.
        labels: their labels (the zero-shot class names), in the same order.
        max_templates: keep at most this many frames.
        min_share: keep a frame only if at least this share of the captions that contain their label use it (rare
            frames, e.g. one odd caption, are noise in an ensemble).

    Returns:
        The frames as templates (``"a large {}"``), or ``["a {}"]`` when no caption contains its label.
    """
    frames = Counter(f for c, lbl in zip(captions, labels) if (f := caption_frame(c, lbl)) is not None)
    total = sum(frames.values())
    kept = [f for f, n in frames.most_common(max_templates) if n >= min_share * total]
    return kept or list(DEFAULT_TEMPLATES)


def attribute_phrases(caption: str, label: str) -> list[str]:
    """Each word of a label of two or more words, alone in the caption's frame ("a large teal triangle", label
    "teal triangle" -> ``["a large teal", "a large triangle"]``); empty when the label is a single word or is not
    in the caption."""
    frame = caption_frame(caption, label)
    words = label.split()
    if frame is None or len(words) < 2:
        return []
    return list(dict.fromkeys(frame.format(w) for w in words))


def attribute_targets(captions: Sequence[str], labels: Sequence[str]) -> tuple[list[str], Tensor]:
    """The attribute phrases of a batch and which image each is a positive of.

    Returns:
        ``phrases``: every distinct attribute phrase of the batch's captions, sorted (the same list on every rank
        given the same global batch), and ``positives``: a bool (n, len(phrases)), True where phrase j is one of
        caption i's. Every phrase is some caption's positive: a phrase that is no image's positive would only ever
        be a negative and would teach that its attribute never occurs.
    """
    per_caption = [attribute_phrases(c, lbl) for c, lbl in zip(captions, labels)]
    phrases = sorted({p for ps in per_caption for p in ps})
    index = {p: j for j, p in enumerate(phrases)}
    positives = torch.zeros(len(per_caption), len(phrases), dtype=torch.bool)
    for i, ps in enumerate(per_caption):
        positives[i, [index[p] for p in ps]] = True
    return phrases, positives


def recombined_captions(
    captions: Sequence[str], labels: Sequence[str], max_captions: int | None = None
) -> list[tuple[str, list[str]]]:
    """Captions of every recombination of the batch's label words, position by position, in each frame, with the
    attribute phrases each is made of.

    Labels of the same number of words are read as attribute slots by position ("teal triangle": colour, shape);
    for each frame and word count, every combination of the words seen in each slot is written into the frame
    ("a large {}" x {teal, red} x {triangle, square} -> four captions), pairs that no image shows included. Only
    text: nothing here says such an image exists.

    Args:
        captions, labels: the batch's captions and their labels.
        max_captions: at most this many (the combinations multiply: 3 slots of 100 words are a million): when there
            are more, an evenly spaced selection of each frame's combinations, in proportion to their number.

    Returns:
        ``(caption, phrases)`` pairs, sorted by caption, ``phrases`` being :func:`attribute_phrases` of it.
    """
    slots: dict[int, list[set[str]]] = {}
    frames: dict[int, set[str]] = {}
    for caption, label in zip(captions, labels):
        words, frame = label.split(), caption_frame(caption, label)
        if frame is None or len(words) < 2:
            continue
        seen = slots.setdefault(len(words), [set() for _ in words])
        for k, w in enumerate(words):
            seen[k].add(w)
        frames.setdefault(len(words), set()).add(frame)
    groups = [(frame, [sorted(v) for v in values]) for n, values in slots.items() for frame in sorted(frames[n])]
    sizes = [math.prod(len(v) for v in values) for _, values in groups]
    total = sum(sizes)
    out: dict[str, list[str]] = {}
    for (frame, values), size in zip(groups, sizes):
        take = size if max_captions is None or total <= max_captions else max(1, max_captions * size // total)
        for i in range(take):
            combo, rest = [], i * size // take  # evenly spaced over the mixed-radix numbering of the combinations
            for v in reversed(values):
                rest, digit = divmod(rest, len(v))
                combo.append(v[digit])
            combo.reverse()
            if len(set(combo)) < len(combo):  # a word in two slots ("red red"): not a caption
                continue
            out[frame.format(" ".join(combo))] = list(dict.fromkeys(frame.format(w) for w in combo))
    return sorted(out.items())


__all__ = [
    "DEFAULT_TEMPLATES",
    "attribute_phrases",
    "attribute_targets",
    "caption_frame",
    "derive_templates",
    "recombined_captions",
]
