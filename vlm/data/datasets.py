"""Image-text datasets over Hugging Face ``datasets`` tables, with a bad-sample policy.

Three torch datasets feed :class:`vlm.data.datamodules.ImageTextDataModule`:

- :class:`ImageTextDataset` (map-style): reads and decodes one row per ``__getitem__``. A bad row (missing,
  empty, truncated or non-image file, empty caption) is skipped by drawing a replacement row, so a batch always
  has ``batch_size`` samples: the distributed contrastive loss needs the same batch on every rank.
- :class:`InMemoryImageTextDataset` (map-style): decodes every row once, drops the bad ones, keeps uint8 pixels
  (and the token ids) in memory: no per-step decoding on the CPU cores that also train the model.
- :class:`StreamingImageTextDataset` (iterable): wraps a streaming ``datasets.IterableDataset`` (webdataset tar
  shards, hub streaming); bad samples are dropped from the stream.

Samples are dicts ``{"image": uint8 (3, H, W), "caption", "label", "path", "skipped"}`` plus any ``extra_columns``
(question records carry ``question`` and ``answers``: :mod:`vlm.data.vqa`); :class:`ImageTextCollate` stacks them,
normalises the pixels and tokenises the captions (or question-answer pairs). ``skipped`` carries the messages of the
bad rows met while producing a sample, so the data module (in the main process) can count and log them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from vlm.data.images import ImageLoadError, display_path, load_image, to_rgb
from vlm.data.vqa import encode_each_once, encode_texts

BadSamplePolicy = Literal["skip", "raise"]
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_MAX_REPLACEMENTS = 100
_NOT_CARRIED = {"image", "caption", "tokens", "skipped"}  # what the collate function turns into other batch entries


class BadSampleError(ValueError):
    """A dataset row that cannot be used (its image failed to load, or its caption is empty).

    Args:
        path: the image file (or row id) of the sample.
        reason: why it is unusable.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"bad sample {display_path(path)}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def resolve_image(value: Any, root: Path | None) -> tuple[str, Any]:
    """A table cell -> (name for messages, something :func:`load_image` reads). Relative paths join ``root``."""
    if isinstance(value, dict):  # a datasets.Image cell with decode=False: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        if data:
            return path or "<bytes>", data
        if path:
            value = path
        else:
            raise BadSampleError("<missing>", "no image")
    if isinstance(value, bytes | bytearray):
        return "<bytes>", value
    if isinstance(value, Image.Image):
        return "<decoded image>", value
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        if root is not None and not path.is_absolute():
            path = root / path
        return str(path), path
    raise BadSampleError(repr(value)[:80], "no image")


def read_sample(
    row: dict[str, Any],
    image_column: str,
    text_column: str,
    label_column: str | None,
    root: Path | None,
    geometry: Callable[[Image.Image], torch.Tensor],
    extra_columns: Sequence[str] = (),
) -> dict[str, Any]:
    """One table row -> a sample dict with a uint8 image (and the ``extra_columns`` as they are); raises
    :class:`BadSampleError` for an unusable row."""
    name, source = resolve_image(row.get(image_column), root)
    caption = row.get(text_column)
    if not isinstance(caption, str) or not caption.strip():
        raise BadSampleError(name, "empty caption")
    try:
        image = to_rgb(source) if isinstance(source, Image.Image) else load_image(source)
    except ImageLoadError as err:
        raise BadSampleError(name, err.reason) from None
    label = row.get(label_column) if label_column else None
    return {
        "image": geometry(image),
        "caption": caption.strip(),
        "label": "" if label is None else str(label),
        "path": display_path(name),
        "skipped": [],
        **{c: row.get(c) for c in extra_columns},
    }


def _is_plain(feature: Any) -> bool:
    """A scalar column (string, number): cheap to hold as a Python list."""
    import datasets

    return isinstance(feature, datasets.Value)


class ImageTextDataset(Dataset):
    """Map-style image-text dataset over a ``datasets.Dataset`` table.

    Args:
        table: rows with an image cell (path, bytes, ``datasets.Image`` dict or PIL image) and a caption.
        image_column: column of the image.
        text_column: column of the caption.
        label_column: column of the class label, or None.
        root: directory that relative image paths are relative to.
        geometry: PIL image -> uint8 tensor (see :mod:`vlm.data.transforms`).
        bad_samples: ``"skip"`` draws a replacement row (recorded in the sample's ``skipped``), ``"raise"`` raises
            :class:`BadSampleError` naming the file.
        seed: seeds the choice of replacement rows (deterministic for a given index).
        extra_columns: further columns copied into each sample (and batch) as they are.
    """

    def __init__(
        self,
        table: Any,
        image_column: str,
        text_column: str,
        label_column: str | None,
        root: Path | None,
        geometry: Callable[[Image.Image], torch.Tensor],
        bad_samples: BadSamplePolicy = "skip",
        seed: int = 0,
        extra_columns: Sequence[str] = (),
    ) -> None:
        self.table = table
        self.extra_columns = tuple(extra_columns)
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.root, self.geometry, self.bad_samples, self.seed = root, geometry, bad_samples, seed
        self._known_bad: set[int] = set()  # per process: never retry a row that already failed
        # Plain-value columns as Python lists: reading a whole row from Arrow costs ~100 us, a list item nothing.
        features = getattr(table, "features", {}) or {}
        wanted = [c for c in (image_column, text_column, label_column, *self.extra_columns)
                  if c is not None and c in features]
        self._lists = {c: table[c][:] for c in wanted if _is_plain(features[c])}
        rest = [c for c in wanted if c not in self._lists]
        self._rest = table.select_columns(rest) if rest else None
        self.recolour: Any = None  # a RecolourView (vlm.data.transforms): colour-free views with its probability

    def __len__(self) -> int:
        return len(self.table)

    def read(self, index: int) -> dict[str, Any]:
        """Row ``index`` as a sample; raises :class:`BadSampleError` if it is unusable."""
        row = {c: values[index] for c, values in self._lists.items()}
        if self._rest is not None:
            row.update(self._rest[index])
        return read_sample(row, self.image_column, self.text_column, self.label_column, self.root, self.geometry,
                           self.extra_columns)

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[str] = []
        candidate = index
        rng = None
        for _ in range(_MAX_REPLACEMENTS):
            if candidate not in self._known_bad:
                try:
                    sample = self.read(candidate)
                    sample["skipped"] = skipped
                    if self.recolour is not None and torch.rand(()) < self.recolour.p:
                        sample["image"] = self.recolour.image(sample["image"])
                        sample["caption"] = self.recolour.caption(sample["caption"])
                    return sample
                except BadSampleError as err:
                    if self.bad_samples == "raise":
                        raise
                    self._known_bad.add(candidate)
                    skipped.append(str(err))
            # A random replacement (not the neighbour) keeps the epoch's sample distribution unbiased.
            rng = rng or np.random.default_rng([self.seed, index])
            candidate = int(rng.integers(len(self)))
        raise RuntimeError(f"{_MAX_REPLACEMENTS} bad samples in a row while replacing row {index}: {skipped[:3]}")


class InMemoryImageTextDataset(Dataset):
    """Decoded samples kept in memory: uint8 images, captions, labels, paths and optional token ids.

    Build it with :meth:`from_dataset`; bad rows are dropped there and reported in :attr:`skipped`.
    """

    def __init__(self, images: list[torch.Tensor], captions: list[str], labels: list[str], paths: list[str],
                 skipped: list[str], augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 extras: dict[str, list[Any]] | None = None) -> None:
        same_shape = len({tuple(x.shape) for x in images}) <= 1
        self.images: torch.Tensor | list[torch.Tensor] = torch.stack(images) if images and same_shape else images
        self.captions, self.labels, self.paths = captions, labels, paths
        self.skipped = skipped
        self.augment = augment
        self.extras = extras or {}  # extra column -> one value per sample
        self.tokens: dict[str, torch.Tensor] | None = None
        self.recolour: Any = None  # a RecolourView (vlm.data.transforms), set by :meth:`set_recolour`
        self.recoloured_captions, self.recoloured_tokens = [], None

    def set_recolour(self, view: Any) -> None:
        """Train on ``view``'s colour-free pairs with its probability (before :meth:`pretokenize`)."""
        self.recolour = view
        self.recoloured_captions = [view.caption(c) for c in self.captions]

    @classmethod
    def from_dataset(
        cls,
        dataset: ImageTextDataset,
        workers: int = 0,
        geometry: Callable[[torch.Tensor], torch.Tensor] | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> InMemoryImageTextDataset:
        """Decodes every row of ``dataset`` once (in ``workers`` processes); bad rows are dropped and counted.

        Args:
            dataset: rows to decode; its ``geometry`` should only convert to uint8 (:func:`pil_to_uint8`).
            workers: decoding processes (0: this one).
            geometry: deterministic transform of uint8 pixels (resize, crop, and possibly normalisation), run
                once over stacked images of equal size (one call per thousand images instead of one per image).
            augment: random transform applied per sample at every access.
        """
        loader = torch.utils.data.DataLoader(
            _RowsOrErrors(dataset), batch_size=256, num_workers=workers, collate_fn=_as_numpy,
            persistent_workers=False,
        )
        images, captions, labels, paths, skipped = [], [], [], [], []
        extras: dict[str, list[Any]] = {c: [] for c in dataset.extra_columns}
        for chunk in loader:
            for item in chunk:
                if isinstance(item, BadSampleError):
                    if dataset.bad_samples == "raise":
                        raise item
                    skipped.append(str(item))
                    continue
                images.append(torch.from_numpy(item["image"]))
                captions.append(item["caption"])
                labels.append(item["label"])
                paths.append(item["path"])
                for c, values in extras.items():
                    values.append(item[c])
        if geometry is not None:
            images = _batched(geometry, images)
        return cls(images, captions, labels, paths, skipped, augment, extras)

    def pretokenize(self, tokenizer: Any) -> None:
        """Tokenises every distinct caption (or question-answer pair) once, so batches only index token tensors; the
        colour-free captions in the same call, so a tokenizer padding to the longest text pads both sets alike."""
        n, views = len(self.captions), self.recoloured_captions if self.recolour is not None else []
        tokens = encode_each_once(tokenizer, self.captions + views, None if views else self.extras.get("question"))
        self.tokens, self.recoloured_tokens = ({k: v[:n] for k, v in tokens.items()},
                                               {k: v[n:] for k, v in tokens.items()}) if tokens else (None, None)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        caption, tokens = self.captions[index], self.tokens
        if self.recolour is not None and torch.rand(()) < self.recolour.p:
            image = self.recolour.image(image)
            caption, tokens = self.recoloured_captions[index], self.recoloured_tokens
        sample = {"image": image, "caption": caption, "label": self.labels[index],
                  "path": self.paths[index], "skipped": [], **{c: v[index] for c, v in self.extras.items()}}
        if tokens is not None:
            sample["tokens"] = {k: v[index] for k, v in tokens.items()}
        return sample


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W), without any resizing."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor],
             chunk: int = 1024) -> list[torch.Tensor]:
    """Applies ``fn`` to stacks of equally sized images (same result as one by one, far fewer calls)."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), chunk):
            part = indices[start : start + chunk]
            result = fn(torch.stack([images[i] for i in part]))
            for i, image in zip(part, result.as_subclass(torch.Tensor).unbind(0)):
                out[i] = image
    return out  # type: ignore[return-value]


def _as_numpy(items: list[dict[str, Any] | BadSampleError]) -> list[dict[str, Any] | BadSampleError]:
    """Pixels as numpy arrays: a worker returning thousands of small tensors would exhaust file descriptors
    (torch shares each tensor through its own one), while arrays travel pickled."""
    for item in items:
        if isinstance(item, dict):
            item["image"] = item["image"].numpy()
    return items


class _RowsOrErrors(Dataset):
    """Yields a sample or the :class:`BadSampleError` of a row, for the one-off decode of the in-memory cache."""

    def __init__(self, dataset: ImageTextDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSampleError:
        try:
            return self.dataset.read(index)
        except BadSampleError as err:
            return err


class StreamingImageTextDataset(IterableDataset):
    """Iterates a streaming ``datasets.IterableDataset``, dropping (and recording) bad samples.

    The wrapped dataset must already be split across ranks (``split_dataset_by_node``); Hugging Face splits it
    further across dataloader workers by shard inside ``__iter__``, so every sample is read once per epoch.

    Args:
        table: the streaming dataset of this rank.
        image_column, text_column, label_column, root, geometry, bad_samples: as for :class:`ImageTextDataset`.
    """

    def __init__(self, table: Any, image_column: str, text_column: str, label_column: str | None,
                 root: Path | None, geometry: Callable[[Image.Image], torch.Tensor],
                 bad_samples: BadSamplePolicy = "skip", extra_columns: Sequence[str] = ()) -> None:
        self.table = table
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.root, self.geometry, self.bad_samples = root, geometry, bad_samples
        self.extra_columns = tuple(extra_columns)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skipped: list[str] = []
        for row in self.table:
            if row.get(self.image_column) is None:  # shards may mix formats: KEY.jpg in one sample, KEY.png next
                other = next((c for c in _IMAGE_EXTENSIONS if row.get(c) is not None), None)
                if other is not None:
                    row = {**row, self.image_column: row[other]}
            try:
                sample = read_sample(row, self.image_column, self.text_column, self.label_column, self.root,
                                     self.geometry, self.extra_columns)
            except BadSampleError as err:
                if self.bad_samples == "raise":
                    raise
                where = f" in {row['__url__']} (key {row.get('__key__')})" if "__url__" in row else ""
                skipped.append(f"{err}{where}")
                continue
            if "__url__" in row:  # name a shard member by its shard: "shard-000003.tar:00001234.png"
                sample["path"] = f"{row['__url__']}:{sample['path'] if sample['path'] != '<bytes>' else row['__key__']}"
            sample["skipped"], skipped = skipped, []
            yield sample


class ImageTextCollate:
    """Samples -> the batch contract: ``image`` (normalised float), the tokenizer's tensors, ``caption``,
    ``label``, ``path``, a list per extra column (``question``, ``answers``...), ``heldout`` (per sample: the row's
    own flag, else whether its label is one of ``heldout``; absent with neither), and ``skipped`` when bad rows were
    met (the data module removes it). Question records are tokenised as question-answer pairs (:func:`encode_texts`).

    Args:
        tokenizer: anything with ``encode_batch(list[str]) -> dict[str, Tensor]``.
        normalize: uint8 batch -> normalised float batch.
        split: named in ``skipped`` (``{"split": ..., "messages": [...]}``) for the data module's counts.
        heldout: class names never seen in training (None or empty: no flag from labels).
    """

    def __init__(self, tokenizer: Any, normalize: Callable[[torch.Tensor], torch.Tensor], split: str = "train",
                 heldout: Iterable[str] | None = None) -> None:
        self.tokenizer, self.normalize, self.split = tokenizer, normalize, split
        self.heldout = frozenset(heldout or ())

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        captions = [s["caption"] for s in samples]
        images = torch.stack([s["image"] for s in samples])
        # uint8 pixels are normalised here, per batch; float pixels were normalised ahead (the in-memory cache).
        batch: dict[str, Any] = {"image": self.normalize(images) if images.dtype == torch.uint8 else images}
        if "tokens" in samples[0]:
            batch.update({k: torch.stack([s["tokens"][k] for s in samples]) for k in samples[0]["tokens"]})
        else:
            questions = [s["question"] for s in samples] if "question" in samples[0] else None
            batch.update(encode_texts(self.tokenizer, captions, questions))
        batch["caption"] = captions
        for key in [k for k in samples[0] if k not in _NOT_CARRIED]:
            batch[key] = [s[key] for s in samples]
        if self.heldout and "heldout" not in batch:  # a row's own flag (question records) wins
            batch["heldout"] = [s.get("label") in self.heldout for s in samples]
        skipped = [m for s in samples for m in s.get("skipped", ())]
        if skipped:
            batch["skipped"] = {"split": self.split, "messages": skipped}
        return batch


__all__ = [
    "BadSampleError",
    "BadSamplePolicy",
    "ImageTextCollate",
    "ImageTextDataset",
    "InMemoryImageTextDataset",
    "StreamingImageTextDataset",
    "pil_to_uint8",
    "read_sample",
    "resolve_image",
]
