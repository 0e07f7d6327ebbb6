"""Text-only data for pretraining a language model (Flamingo's stage 2: the decoder it later freezes).

:class:`TextDataModule` reads the text column of any source :func:`vlm.data.sources.load_table` understands (a
JSONL/CSV file, an imagefolder's ``metadata.jsonl``, or a Hugging Face hub dataset for users with internet).
:class:`ShapesTextDataModule` writes captions in the language of the built-in shapes (:mod:`vlm.data.shapes`) in
memory, with no images at all.

Batches are ``{**tokenizer.encode_batch(texts), "caption": texts}``; the tokenizer is a constructor argument, which
``vlm fit`` links to the task's. Every distinct text is tokenised once, in ``setup``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


class _EncodedTexts(Dataset):
    """Texts with their token tensors, encoded once for the whole split."""

    def __init__(self, texts: list[str], tokenizer: Any) -> None:
        unique, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
        encoded = tokenizer.encode_batch([str(t) for t in unique])
        index = torch.from_numpy(inverse.astype(np.int64))
        self.tensors = {k: v[index] for k, v in encoded.items()}
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.tensors.items()}, "caption": self.texts[i]}


class TextDataModule(LightningDataModule):
    """Texts from a local file / folder or a hub dataset, tokenised by the task's tokenizer.

    Args:
        train: training source (see :func:`vlm.data.sources.load_table`); None: no training data.
        val: validation source; None: no validation.
        text_column: the text column (falls back to ``caption`` / ``text`` / ``txt``).
        train_split: hub split for ``train``.
        val_split: hub split for ``val``.
        hub_config: hub dataset configuration name.
        batch_size: per-rank batch size.
        val_batch_size: per-rank validation batch size (default: ``batch_size``).
        num_workers: dataloader workers (0 suits pre-tokenised data on a small machine).
        tokenizer: turns texts into the batch's tensors (``encode_batch``): the task's (``vlm fit`` links it). Needed
            by :meth:`setup`.
        recombine: also train on the captions of every recombination of the label words, slot by slot, in the
            captions' own frames (:func:`vlm.prompts.recombined_captions`: "a large red circle" and "a small blue
            triangle" give "a large red triangle"...), as many of them as there are training captions. A language
            model trained only on a dataset's captions learns that a held-out pair never occurs ("red" is never
            followed by "triangle"), and a captioner on it inherits that; a web-text model knows every pair.
            Reads the label column (``label_column``); without one, or with no label inside its caption, it warns
            and trains on the captions alone. Off by default.
        label_column: the labels' column for ``recombine``.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        text_column: str = "text",
        train_split: str = "train",
        val_split: str = "validation",
        hub_config: str | None = None,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        tokenizer: Any | None = None,
        recombine: bool = False,
        label_column: str = "label",
    ) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.recombine, self.label_column = recombine, label_column
        self.text_column = text_column
        self.train_split, self.val_split, self.hub_config = train_split, val_split, hub_config
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.tokenizer = tokenizer
        self.train_dataset: _EncodedTexts | None = None
        self.val_dataset: _EncodedTexts | None = None

    def texts(self, split: str) -> list[str]:
        """The non-empty texts of ``split`` (``"train"`` or ``"validation"``)."""
        from vlm.data.sources import TEXT_FALLBACKS, load_table, pick_column

        source = self.train if split == "train" else self.val
        if source is None:
            return []
        table = load_table(source, self.train_split if split == "train" else self.val_split,
                           hub_config=self.hub_config)
        columns = list(table.data.column_names)
        column = pick_column(columns, self.text_column, TEXT_FALLBACKS, "text", source)
        texts = [t for t in table.data[column] if isinstance(t, str) and t.strip()]
        if split == "train" and self.recombine:
            texts += self._recombined(table.data, columns, column, source, len(texts))
        return texts

    def _recombined(self, data: Any, columns: list[str], column: str, source: str, count: int) -> list[str]:
        """``count`` texts cycling over the recombined captions of the training captions and labels."""
        from vlm.data.sources import LABEL_FALLBACKS, pick_column
        from vlm.prompts import recombined_captions

        try:
            labels = data[pick_column(columns, self.label_column, LABEL_FALLBACKS, "label", source)]
        except ValueError:
            labels = []
        pairs = [(c, lbl) for c, lbl in zip(data[column], labels)
                 if isinstance(c, str) and c.strip() and isinstance(lbl, str) and lbl.strip()]
        captions = [c for c, _ in recombined_captions([c for c, _ in pairs], [lbl for _, lbl in pairs])]
        if not captions:
            log.warning("%s: recombine found no labels of two or more words inside their captions; training on the "
                        "captions alone", source)
            return []
        return [captions[i % len(captions)] for i in range(count)]

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__}: no tokenizer; pass tokenizer=... (vlm fit hands it the task's)")
        if stage in ("fit", None) and self.train_dataset is None:
            texts = self.texts("train")
            if texts:
                self.train_dataset = _EncodedTexts(texts, self.tokenizer)
        if self.val_dataset is None:
            texts = self.texts("validation")
            if texts:
                self.val_dataset = _EncodedTexts(texts, self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: no training texts")
        return DataLoader(self.train_dataset, self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, self.val_batch_size, num_workers=self.num_workers)


def shapes_captions(count: int, seed: int, all_pairs: bool = True, two_object_prob: float = 0.5) -> list[str]:
    """Captions with the grammar and vocabulary of :mod:`vlm.data.shapes`, sampled without images."""
    from vlm.data import shapes

    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES] if all_pairs else list(shapes.TRAIN_PAIRS)
    sizes = list(shapes.SIZES)

    def obj() -> shapes.ShapeObject:
        colour, shape = pairs[rng.integers(len(pairs))]
        return shapes.ShapeObject(colour, shape, sizes[rng.integers(len(sizes))], 0.0, 0.0, (0, 0, 0))

    out = []
    for _ in range(count):
        if rng.random() < two_object_prob:
            relation = shapes.RELATIONS[rng.integers(len(shapes.RELATIONS))]
            scene = shapes.Scene([obj(), obj()], (0, 0, 0), relation)
        else:
            scene = shapes.Scene([obj()], (0, 0, 0))
        out.append(shapes.caption(scene))
    return out


class ShapesTextDataModule(TextDataModule):
    """Captions in the language of the built-in shapes, generated in memory: the decoder's text corpus.

    A language model learns its language from text alone. With ``all_pairs`` (the default) the corpus names
    every colour-shape pair, including the pairs whose *images* are held out of image-text training: the
    held-out split tests whether Flamingo grounds words it knows in images it has never seen them with, as a
    web-text language model knows "red triangle" long before it meets a picture of one.

    Args:
        num_train: training captions.
        num_val: validation captions.
        seed: sampling seed (validation uses ``seed + 1``).
        all_pairs: every colour-shape pair (True) or only the pairs of the image-text training split.
        two_object_prob: fraction of two-object captions ("a small red circle left of a large blue square").
        batch_size, val_batch_size, num_workers, tokenizer: as for :class:`TextDataModule`.
    """

    def __init__(
        self,
        num_train: int = 50000,
        num_val: int = 2000,
        seed: int = 0,
        all_pairs: bool = True,
        two_object_prob: float = 0.5,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        tokenizer: Any | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         tokenizer=tokenizer)
        self.num_train, self.num_val, self.seed = num_train, num_val, seed
        self.all_pairs, self.two_object_prob = all_pairs, two_object_prob

    def texts(self, split: str) -> list[str]:
        if split == "train":
            return shapes_captions(self.num_train, self.seed, self.all_pairs, self.two_object_prob)
        return shapes_captions(self.num_val, self.seed + 1, self.all_pairs, self.two_object_prob)


__all__ = ["ShapesTextDataModule", "TextDataModule", "shapes_captions"]
