"""VQA accuracy as the VQAv2 evaluation (and OpenFlamingo's eval suite, which uses it) computes it.

An answer is compared after the VQAv2 normalisation (:func:`normalize_answer`): punctuation removed or turned into a
space, a period kept only before a digit, lower case, number words as digits, articles dropped, common
contractions written with their apostrophe. Then:

- with one reference answer, the score is exact match of the normalised texts (1 or 0);
- with several (VQAv2 has ten human answers per question), the score is the soft ``min(#matching humans / 3, 1)``,
  averaged, as the official script does, over the n subsets of n - 1 humans: leave each human out in turn, count
  how many of the others gave the answer, take ``min(count / 3, 1)``, and average. With ten answers: 2 matching
  score 0.6, 3 score 0.9, 4 or more 1.0.

The official script normalises only when the humans disagree (its stored answers are already normalised); here both
sides are always normalised, so raw answers from a user's folder compare the same way. Its period pattern (meant as
"a period not between digits") removes every period that is not followed by a digit, and this module does the same.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Replaced by nothing when the text writes them next to a space (or holds a digit-comma-digit number), else by a
# space ("red/blue" -> "red blue", "yes, it is" -> "yes it is", "1,000" -> "1000"). Periods, apostrophes and colons
# are not in the list: periods have their own rule, apostrophes belong to contractions.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# Contractions as people type them without the apostrophe ("dont") -> as written ("don't"). Forms whose bare
# spelling is another word ("we'll"/"well", "it's"/"its", "we're"/"were", "she'd"/"shed") are left alone.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hasn't haven't he'd he's how'd "
    "how'll how's i'm i've isn't it'd it'll ma'am mightn't might've mustn't must've needn't o'clock shan't "
    "should've shouldn't shouldn't've that's there'd there're there's they'd they'll they're they've 'twas wasn't "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'll who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all you'd you'll you're you've"
).split()
CONTRACTIONS = {word.replace("'", ""): word for word in _CONTRACTED}
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # "yes." -> "yes", "3.5" stays
_HUMANS_FOR_FULL_SCORE = 3


def _punctuation(text: str) -> str:
    number = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in PUNCTUATION:
        spaced = f"{p} " in text or f" {p}" in text  # looked up in the text as given, as the official script does
        out = out.replace(p, "" if spaced or number else " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """The VQAv2 normal form of an answer: ``"Two."`` -> ``"2"``, ``"a dog"`` -> ``"dog"``, ``"dont"`` ->
    ``"don't"``."""
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """One question's VQA accuracy in [0, 1]: exact match after normalisation against one answer, the averaged
    soft score (see the module docstring) against several.

    Raises:
        ValueError: no reference answer.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("a question needs at least one reference answer")
    predicted = normalize_answer(prediction)
    hits = [normalize_answer(a) == predicted for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    matching = sum(hits)
    # Leave each human out in turn: the others that match, min(count / 3, 1), averaged over the len(hits) subsets.
    return sum(min(1.0, (matching - hit) / _HUMANS_FOR_FULL_SCORE) for hit in hits) / len(hits)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """The mean :func:`vqa_score` over questions (``answers[i]``: question i's reference answers)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("no questions to score")
    return sum(vqa_score(p, a) for p, a in zip(predictions, answers)) / len(predictions)


def vqa_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                heldout: Sequence[bool | None] | None = None) -> dict[str, float]:
    """``vqa_accuracy`` over every question, and, where ``heldout`` flags questions (None: no flag),
    ``vqa_accuracy_heldout`` / ``vqa_accuracy_seen`` over the flagged / unflagged ones that exist."""
    metrics = {"vqa_accuracy": vqa_accuracy(predictions, answers)}
    flags = list(heldout) if heldout is not None else []
    if any(f is not None for f in flags):
        scores = [vqa_score(p, a) for p, a in zip(predictions, answers)]
        for name, keep in (("heldout", True), ("seen", False)):
            sel = [s for s, f in zip(scores, flags) if f is not None and bool(f) == keep]
            if sel:
                metrics[f"vqa_accuracy_{name}"] = sum(sel) / len(sel)
    return metrics


def first_answer(generated: str) -> str:
    """The answer part of a generated text: what comes before a following "Question" or "Answer" (a model may go on
    to write the next few-shot turn), stripped."""
    return re.split("Question|Answer", generated, maxsplit=1)[0].strip()


__all__ = ["first_answer", "normalize_answer", "vqa_accuracy", "vqa_metrics", "vqa_score"]
