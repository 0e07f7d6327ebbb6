"""Image-text retrieval recall of a CLIP checkpoint over a captioned folder with several captions per image, and the
compositional test on the same embeddings (``vlm retrieval``; the command is in :mod:`vlm.cli`).

The folder is read and its images embedded as :mod:`vlm.index` does for search (:func:`~vlm.index.read_captions`,
:func:`~vlm.index.embed_files`); the metrics are pure functions of the embeddings
(:func:`vlm.metrics.multi_caption_recall`, :func:`vlm.compositionality.compositional_scores`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm.compositionality import compositional_scores
from vlm.index import embed_files, read_captions
from vlm.inference import CLIPPredictor
from vlm.inputs import METADATA_FILE, printable
from vlm.metrics import multi_caption_recall

RECALL_KS = (1, 5, 10)


@dataclass
class RetrievalReport:
    """:func:`retrieval_eval`'s recalls (``image_to_text_R@k``, ``text_to_image_R@k``), counts and skipped images;
    with ``compositional`` asked for, the compositional scores by type (None for a folder without labels)."""

    metrics: dict[str, float]
    images: int
    captions: int
    failed: dict[str, str]
    compositional: dict[str, dict[str, float | int] | None] | None = None


def _say(message: str) -> None:
    print(printable(message), file=sys.stderr, flush=True)


def retrieval_eval(predictor: CLIPPredictor, images_dir: str | os.PathLike, ks: Sequence[int] = RECALL_KS,
                   warn: Callable[[str], None] = _say, compositional: bool = False) -> RetrievalReport:
    """Image->text and text->image recall@k (:func:`vlm.metrics.multi_caption_recall`) over a folder whose
    ``metadata.jsonl`` gives each image its captions (:func:`~vlm.index.read_captions`). An image that cannot be read
    is reported through ``warn`` and left out with its captions. With ``compositional``, also how often each
    caption beats its hard negatives (:func:`vlm.compositionality.compositional_scores`), built from the rows'
    ``label``; the same image and caption embeddings serve both. Raises ``ValueError`` (``UnsafeFileError``
    included) for a missing or unusable metadata file, or no readable image in it."""
    root = Path(images_dir)
    labels: dict[str, list[str | None]] | None = {} if compositional else None
    captions = read_captions(root, warn, labels)
    if not captions:
        raise ValueError(f"{root / METADATA_FILE} gives no image a caption")
    failed: dict[str, str] = {}
    ok, parts = [], []  # readable images, their embeddings batch by batch

    def skip(name: str, reason: str) -> None:
        failed[name] = reason
        warn(f"vlm retrieval: skipped {root / name}: {reason}")

    for _, embedded in embed_files(predictor, root, list(captions), skip, predictor.batch_size):
        if embedded:
            parts.append(torch.stack(list(embedded.values())).to(predictor.device))
            ok += list(embedded)
    if not ok:
        raise ValueError(f"none of the {len(captions)} images named in {root / METADATA_FILE} could be read")
    texts = [t for name in ok for t in captions[name]]
    owner = torch.tensor([i for i, name in enumerate(ok) for _ in captions[name]], device=predictor.device)
    image, text = torch.cat(parts), predictor.embed_texts(texts)
    report = RetrievalReport(multi_caption_recall(image, text, owner, ks), len(ok), len(texts), failed)
    text_labels = [label for name in ok for label in labels[name]] if labels is not None else []
    if any(text_labels):
        report.compositional = compositional_scores(image, text, owner, texts, text_labels, predictor.embed_texts)
    return report


__all__ = ["RECALL_KS", "RetrievalReport", "retrieval_eval"]
