"""Text tokenizers.

:class:`CLIPTokenizer` wraps the byte-pair-encoding tokenizer that ``open-clip-torch`` ships (OpenAI's 49,408-token
CLIP vocabulary) so that token ids match open_clip exactly and pretrained CLIP text towers load.

Every tokenizer in vlm offers ``encode_batch(texts) -> dict[str, Tensor]``: the data modules call it in their
collate function and merge the result into the batch, so the task that owns the tokenizer decides which text
tensors its batches carry.
"""

from __future__ import annotations

from functools import cached_property

from torch import Tensor


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
        # Imported lazily: open_clip pulls in a lot, and scripts that only load a checkpoint start faster.
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=self.context_length)

    def __getstate__(self) -> dict:
        return {"context_length": self.context_length}  # the BPE tables are rebuilt in each dataloader worker

    def __setstate__(self, state: dict) -> None:
        self.context_length = state["context_length"]

    @property
    def vocab_size(self) -> int:
        return len(self._bpe.encoder)

    @property
    def sot_token_id(self) -> int:
        return self._bpe.sot_token_id

    @property
    def eot_token_id(self) -> int:
        return self._bpe.eot_token_id

    def __call__(self, texts: str | list[str]) -> Tensor:
        """Texts -> token ids (n, context_length), dtype long."""
        if isinstance(texts, str):
            texts = [texts]
        return self._bpe(list(texts), context_length=self.context_length)

    def encode_batch(self, texts: list[str]) -> dict[str, Tensor]:
        """The text tensors a contrastive batch carries: ``{"text": ids}``."""
        return {"text": self(texts)}

    def decode(self, ids: Tensor | list[int]) -> str:
        """Token ids -> text, without the special and padding tokens."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        keep = [i for i in ids if i not in (0, self.sot_token_id, self.eot_token_id)]
        return self._bpe.decode(keep).strip()


__all__ = ["CLIPTokenizer"]
