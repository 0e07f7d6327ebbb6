"""Caption metrics: BLEU-4 and CIDEr-D values, not just their keys, and the normalisation vlm applies first."""

from __future__ import annotations

import contextlib
import io

import pytest

from vlm.captions import attribute_correct, caption_scores, normalize_caption


def test_identical_and_disjoint_captions_score_at_the_ends():
    same = caption_scores(["a small red circle left of a blue star"], ["a small red circle left of a blue star"])
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)
    disjoint = caption_scores(["one two three four five"], ["a small red circle left of"])
    assert disjoint["bleu4"] < 1e-6 and disjoint["cider"] == 0.0


def test_case_and_punctuation_do_not_count():
    refs = ["a small red circle left of a blue star", "a large green cross"]
    plain = caption_scores(["a small red circle left of a blue star", "a large green square"], refs)
    noisy = caption_scores(["A small, RED circle left of a blue star!", "A large green square."], refs)
    assert plain == noisy
    assert normalize_caption("  A Red-circle, (left)! ") == "a red circle left"


def test_values_equal_pycocoevalcap_on_a_multi_reference_corpus():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    preds = ["a red circle above a blue star", "a large green cross", "a small yellow square"]
    refs = [["a red circle above a blue star", "a red circle over a star"], ["a big green cross", "a green cross"],
            ["a small yellow square on the right"]]
    scores = caption_scores(preds, refs)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
    assert scores == {"bleu4": pytest.approx(bleu[3]), "cider": pytest.approx(cider)}
    assert 0.0 < scores["bleu4"] < 1.0 and scores["cider"] > 0.0
    # a worse corpus scores lower on both
    worse = caption_scores(["a blue star", "a red square", "a cross"], refs)
    assert worse["bleu4"] < scores["bleu4"] and worse["cider"] < scores["cider"]


def test_attribute_accuracy_needs_every_attribute_word_in_order():
    words = {"red", "blue", "circle", "star", "small", "large"}
    assert attribute_correct("a small red circle", "a small red circle", words)
    assert not attribute_correct("a small blue circle", "a small red circle", words)
    assert not attribute_correct("a red circle", "a small red circle", words)  # the size word is missing
    assert not attribute_correct("a star and a circle", "a circle and a star", words)  # order matters
