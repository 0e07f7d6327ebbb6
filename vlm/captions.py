"""Caption scores: corpus BLEU-4 and CIDEr-D (pycocoevalcap) and attribute accuracy on the synthetic shapes data.

Shared by the Flamingo task's validation and ``scripts/caption.py``, which imports it without Lightning.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Sequence


def normalize_caption(text: str) -> str:
    """Lower case, punctuation removed, single spaces: the words the scorers compare."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def caption_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of ``predictions`` against one or more references each."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return {}
    gts = {i: [normalize_caption(r) for r in ([ref] if isinstance(ref, str) else ref)]
           for i, ref in enumerate(references)}
    res = {i: [normalize_caption(p) or "<empty>"] for i, p in enumerate(predictions)}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their statistics
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def shapes_attribute_words() -> list[str]:
    """Colour, shape and size words of the built-in synthetic data."""
    from vlm.data.shapes import COLOURS, SHAPES, SIZES

    return [*COLOURS, *SHAPES, *SIZES]


def attribute_correct(prediction: str, reference: str, words: set[str]) -> bool:
    """Whether the prediction names exactly the reference's attribute words, in order."""
    def attrs(text: str) -> list[str]:
        return [w for w in normalize_caption(text).split() if w in words]

    return attrs(prediction) == attrs(reference)


__all__ = ["attribute_correct", "caption_scores", "normalize_caption", "shapes_attribute_words"]
