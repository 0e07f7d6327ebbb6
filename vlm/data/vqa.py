"""Question records (visual question answering) as :class:`~vlm.data.datamodules.ImageTextDataModule` reads them.

A table with a ``question`` column holds one question per row: ``question``, the image, and ``answer`` (a string)
or ``answers`` (a list of answers, VQAv2-style; in a CSV file a JSON list such as ``["2", "two"]``), optionally
``heldout`` (true for questions about what training never showed). :func:`question_table` brings it to one shape:

- ``answer``: the answer the model trains on: ``answer`` where the row gives one, else the most frequent of
  ``answers`` (compared ignoring case and surrounding spaces; a tie goes to the one listed first);
- ``answers``: the answers it is scored against (``[answer]`` where the row gives only one).

The data module then uses ``answer`` as the sample's text and carries ``question``, ``answers`` (and ``heldout``)
into the batch; the tokenizer's ``encode_questions`` writes the prompt and masks it in the labels
(:meth:`~vlm.data.gpt2_tokenizer.FlamingoTokenizer.encode_questions`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

QUESTION_COLUMN = "question"
ANSWER_COLUMN = "answer"
ANSWERS_COLUMN = "answers"
HELDOUT_COLUMN = "heldout"


def is_question_table(columns: Sequence[str]) -> bool:
    """Whether a table's rows are questions (it has a ``question`` column)."""
    return QUESTION_COLUMN in columns


def parse_answers(value: Any) -> list[str]:
    """A row's ``answers`` cell as a list of non-empty strings: a list, a JSON list in a string, or one answer."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = [text]
        else:
            value = [text]
    if not isinstance(value, list | tuple):
        return []
    return [str(a).strip() for a in value if a is not None and str(a).strip()]


def training_answer(answers: Sequence[str]) -> str:
    """The most frequent answer (ignoring case and surrounding spaces; ties: the first listed), as first written;
    ``""`` for none."""
    keys = [" ".join(a.lower().split()) for a in answers]
    if not keys:
        return ""
    counts = Counter(keys)
    best = max(counts.values())
    return next(a.strip() for a, k in zip(answers, keys) if counts[k] == best)


def encode_texts(tokenizer: Any, captions: list[str], questions: list[str] | None = None) -> dict[str, Any]:
    """A batch's text tensors: the captions, or, for question records, the question-answer pairs (the caption is then
    the answer) through the tokenizer's ``encode_questions``."""
    if questions is None:
        return tokenizer.encode_batch(captions)
    if not hasattr(tokenizer, "encode_questions"):
        raise ValueError(f"question records need a tokenizer that writes question prompts (a FlamingoTask's), not "
                         f"{type(tokenizer).__name__}")
    return tokenizer.encode_questions(questions, captions)


def question_table(data: Any, columns: Sequence[str], source: str) -> tuple[Any, tuple[str, ...]]:
    """A ``datasets.Dataset`` of question records with ``answer`` (to train on) and ``answers`` (to score against)
    as described in the module docstring, and the columns to carry into batches besides the image and the answer.

    Raises:
        ValueError: a table with neither ``answer`` nor ``answers``, or a stream (question records are read from
            imagefolders and CSV / JSONL files).
    """
    if not hasattr(data, "add_column"):
        raise ValueError(f"{source}: question records are read from an imagefolder or a CSV / JSONL file, not a stream")
    if ANSWER_COLUMN not in columns and ANSWERS_COLUMN not in columns:
        raise ValueError(f"{source}: question records need an {ANSWER_COLUMN!r} or {ANSWERS_COLUMN!r} column; columns "
                         f"are {sorted(columns)}")
    n = len(data)
    given = data[ANSWER_COLUMN][:] if ANSWER_COLUMN in columns else [None] * n
    lists = [parse_answers(v) for v in data[ANSWERS_COLUMN][:]] if ANSWERS_COLUMN in columns else [[]] * n
    answers, targets = [], []
    for one, many in zip(given, lists):
        one = str(one).strip() if one is not None else ""
        answers.append(many or ([one] if one else []))
        targets.append(one or training_answer(many))  # an empty target: the row is dropped as an empty caption
    questions = [" ".join(str(q).split()) if q is not None else "" for q in data[QUESTION_COLUMN][:]]
    data = data.remove_columns([c for c in (QUESTION_COLUMN, ANSWER_COLUMN, ANSWERS_COLUMN) if c in columns])
    data = data.add_column(QUESTION_COLUMN, questions).add_column(ANSWER_COLUMN, targets)
    data = data.add_column(ANSWERS_COLUMN, answers)
    extra = (QUESTION_COLUMN, ANSWERS_COLUMN) + ((HELDOUT_COLUMN,) if HELDOUT_COLUMN in columns else ())
    return data, extra


def encode_each_once(tokenizer: Any, captions: list[str], questions: list[str] | None) -> dict[str, Any] | None:
    """The token tensors of each sample's caption (or question-answer pair), each distinct one encoded once; None
    where the tokenizer does not give one tensor row per text."""
    import torch

    keys = list(zip(questions if questions is not None else [None] * len(captions), captions))
    first: dict[tuple, int] = {}
    inverse = [first.setdefault(k, len(first)) for k in keys]
    unique = list(first)
    encoded = encode_texts(tokenizer, [str(c) for _, c in unique],
                           None if questions is None else [str(q) for q, _ in unique])
    if not all(isinstance(v, torch.Tensor) and v.shape[:1] == (len(unique),) for v in encoded.values()):
        return None
    index = torch.tensor(inverse, dtype=torch.long)
    return {k: v[index] for k, v in encoded.items()}


__all__ = [
    "ANSWERS_COLUMN",
    "ANSWER_COLUMN",
    "HELDOUT_COLUMN",
    "QUESTION_COLUMN",
    "encode_each_once",
    "encode_texts",
    "is_question_table",
    "parse_answers",
    "question_table",
    "training_answer",
]
