"""The one LightningDataModule for image-text data.

:class:`ImageTextDataModule` serves any source :func:`vlm.data.sources.load_table` reads (imagefolder, CSV/JSONL,
webdataset shards, hub names), or a :class:`~vlm.data.builtin.DataSource` that writes its own folder on first use
(the built-in shapes and digits). Batches follow the contract the tasks rely on::

    {"image": float (b, 3, H, W), **tokenizer.encode_batch(captions), "caption": [str], "label": [str],
     "path": [str], "heldout": [bool]}

``heldout`` flags each sample whose label is in :attr:`~ImageTextDataModule.heldout_classnames` (question records keep
their own column); without either it is absent. The tasks split their held-out / seen metrics by it.

The tokenizer, image size and normalisation are constructor arguments. ``vlm fit`` hands it the task's (a
LightningCLI link in :mod:`vlm.__main__`), so a config states them once, on the task and its model.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from vlm.data import transforms as T
from vlm.data.builtin import DataSource
from vlm.data.datasets import (
    BadSamplePolicy,
    ImageTextCollate,
    ImageTextDataset,
    InMemoryImageTextDataset,
    StreamingImageTextDataset,
    pil_to_uint8,
)
from vlm.data.resumable import EpochSampler, ResumableDataLoader
from vlm.data.shards import EqualBatchesDataLoader
from vlm.data.sources import (
    IMAGE_FALLBACKS,
    LABEL_FALLBACKS,
    TEXT_FALLBACKS,
    DataLayoutError,
    Table,
    load_table,
    pick_column,
)
from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, eval_geometry, normalize, train_geometry
from vlm.data.vqa import ANSWER_COLUMN, is_question_table, question_table

log = logging.getLogger("vlm.data")
_LOGGED_PATHS = 5  # bad samples named in the log before only counting


class Tokenizer(Protocol):
    """What a data module needs from a tokenizer."""

    def encode_batch(self, texts: list[str]) -> dict[str, torch.Tensor]: ...


class ImageTextDataModule(LightningDataModule):
    """Image-caption pairs from local files, webdataset shards, the Hugging Face hub or a built-in generator.

    Args:
        train: training source: an imagefolder directory (``metadata.jsonl``), a CSV/JSONL file of (image path,
            caption[, label]), webdataset ``.tar`` shards (a directory, a file or a ``{000..009}`` pattern), or a
            hub dataset name. None: no training data. Rows with a ``question`` are question records
            (:mod:`vlm.data.vqa`): batches then also carry ``question`` and ``answers``.
        val: validation source (same kinds). Its labels and ``classnames.txt`` give the zero-shot classes.
        source: a folder that writes itself (:class:`~vlm.data.builtin.ShapesSource`,
            :class:`~vlm.data.builtin.DigitsSource`): written in ``prepare_data`` if missing, then read as ``train``
            and ``val``, which are then not given.
        image_column: image column (imagefolders' ``file_name`` is mapped to it; shards fall back to
            ``jpg``/``png``...).
        text_column: caption column (shards fall back to ``txt``).
        label_column: class-label column, or None.
        train_split: hub split name for ``train``.
        val_split: hub split name for ``val``.
        hub_config: hub dataset configuration name.
        streaming: stream hub datasets (shards always stream), split across ranks and workers.
        batch_size: per-rank batch size.
        val_batch_size: per-rank validation batch size (default: ``batch_size``).
        num_workers: dataloader worker processes. 0 suits in-memory data on a 2-core machine: the workers would
            compete with training for the same cores.
        pin_memory: pin host memory (for GPU training).
        drop_last: drop the last incomplete training batch, so every rank and step has ``batch_size`` samples
            (the distributed contrastive loss needs equal batches).
        augment: random resized crops for training (no flips: captions say left/right).
        rotation: with ``augment``, also rotate training images by a random angle up to this many degrees (colours
            and sides kept, corners filled with the image; see :func:`vlm.data.transforms.train_geometry`). 0: off.
        recolour: probability that a training pair becomes its colour-free view (colours scrambled, colour words
            struck: :class:`~vlm.data.transforms.RecolourView`); not for streams or question records. 0: off.
        in_memory: decode every image once in ``setup`` and keep the pixels (and token ids) in memory; for
            datasets that fit in RAM this makes loading nearly free.
        cache_workers: processes that decode the in-memory cache (0: the main process).
        bad_samples: ``"skip"`` (default) drops unreadable images and empty captions, counts them and logs the
            first few; a skipped training sample is replaced so batches keep their size. ``"raise"`` stops with
            an error naming the file.
        tokenizer: turns captions into the batch's text tensors (``encode_batch``): the task's (``vlm fit`` links
            it). Needed by :meth:`setup`.
        image_size: side of the images the model takes (``vlm fit`` links the task's).
        image_mean: per-channel normalisation mean (``vlm fit`` links the task's).
        image_std: per-channel normalisation std (``vlm fit`` links the task's).
        seed: seeds the training order (epoch ``e`` is permutation ``seed + e``, so a resumed run continues the
            same order) and the choice of replacement samples.
        caption_template: for a folder of class sub-folders (``train/red_circle/*.png``), each image's caption: the
            template with ``{}`` replaced by the folder's label (``"a {}"`` -> ``a red circle``). None: the task's
            first zero-shot template (``a {}`` when the task derives its templates from the captions), else, with
            no task, the label itself.

    A training set smaller than one batch (per rank) trains with a batch of its size, with a warning, rather than
    with no batches at all.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        source: DataSource | None = None,
        image_column: str = "image",
        text_column: str = "caption",
        label_column: str | None = "label",
        train_split: str = "train",
        val_split: str = "validation",
        hub_config: str | None = None,
        streaming: bool = False,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        augment: bool = False,
        rotation: float = 0.0,
        recolour: float = 0.0,
        in_memory: bool = False,
        cache_workers: int = 0,
        bad_samples: BadSamplePolicy = "skip",
        tokenizer: Tokenizer | None = None,
        image_size: int = 224,
        image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, float, float] = OPENAI_CLIP_STD,
        seed: int = 0,
        caption_template: str | None = None,
    ) -> None:
        super().__init__()
        if bad_samples not in ("skip", "raise"):
            raise ValueError(f"bad_samples must be 'skip' or 'raise', got {bad_samples!r}")
        if source is not None:
            if train is not None or val is not None:
                raise ValueError("give either a source or train / val, not both: the source names its splits")
            train, val = source.train, source.val
        self.train, self.val, self.source = train, val, source
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.train_split, self.val_split = train_split, val_split
        self.hub_config, self.streaming = hub_config, streaming
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        self.augment, self.in_memory, self.cache_workers = augment, in_memory, cache_workers
        if not 0 <= rotation <= 180:
            raise ValueError(f"rotation is a largest angle in degrees, 0 to 180, got {rotation}")
        self.rotation = float(rotation)
        if not 0.0 <= recolour <= 1.0:
            raise ValueError(f"recolour is a probability, 0 to 1, got {recolour}")
        self.recolour = float(recolour)
        self.bad_samples: BadSamplePolicy = bad_samples
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.seed = seed
        if caption_template is not None and (not isinstance(caption_template, str) or "{}" not in caption_template
                                             or set("{}") & set(caption_template.replace("{}", "", 1))):
            # one plain {} and no other brace: a wrong one is refused when the config is read
            raise ValueError(f"caption_template {caption_template!r} must hold exactly one {{}} and no other brace")
        self.caption_template = caption_template
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.skipped: Counter[str] = Counter()  # split -> bad samples met so far (this process)
        self._logged = 0

    # ----------------------------------------------------------------------------------------- set-up
    def prepare_data(self) -> None:
        if self.source is not None:
            self.source.prepare()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__}: no tokenizer; pass tokenizer=... (vlm fit hands it the task's)")
        try:
            if stage in ("fit", None) and self.train is not None and self.train_dataset is None:
                self.train_dataset = self._build(self.train, self.train_split, training=True)
            if self.val is not None and self.val_dataset is None:
                self.val_dataset = self._build(self.val, self.val_split, training=False)
        except FileNotFoundError as e:  # a data path that does not exist: the user's to fix, as a folder in no
            raise DataLayoutError(str(e)) from None  # layout is (vlm fit prints it as one line, exit 2)

    def _caption_template(self) -> str:
        """The template that turns a class folder's label into captions (see ``caption_template``)."""
        if self.caption_template is not None:
            return self.caption_template
        task = getattr(self.trainer, "lightning_module", None)  # None without a trainer (or a stand-in of one)
        templates = getattr(task, "templates", None)
        # The task's first prompt when it names prompts; a template set's name or "auto" (derived from captions,
        # which class folders do not have) gives the plain default.
        prompts = [templates] if isinstance(templates, str) else list(templates or [])
        first = next((p for p in prompts if isinstance(p, str) and "{}" in p), None)
        if first is not None:
            return first
        return "a {}" if templates else "{}"

    def _build(self, source: str, split: str, training: bool) -> Any:
        table = load_table(source, split, self.image_column, self.hub_config, self.streaming,
                           caption_template=self._caption_template())
        columns = list(getattr(table.data, "column_names", None) or (table.data.features or {}).keys())
        extra: tuple[str, ...] = ()
        if is_question_table(columns):  # question records: the answer to train on is the text (vlm.data.vqa)
            table.data, extra = question_table(table.data, columns, source)
            columns = list(table.data.column_names)
        image_col = pick_column(columns, self.image_column, IMAGE_FALLBACKS, "image", source)
        text_col = ANSWER_COLUMN if extra else pick_column(columns, self.text_column, TEXT_FALLBACKS, "caption", source)
        label_col = None
        if self.label_column is not None:
            try:
                label_col = pick_column(columns, self.label_column, LABEL_FALLBACKS, "label", source)
            except ValueError:
                label_col = None  # labels are optional (only zero-shot metrics need them)
        augment = self.augment and training
        cache = self.in_memory and not table.streaming
        # In memory: decode to native-size uint8 once, then resize + crop once (or, augmenting, per sample).
        geometry = pil_to_uint8 if cache else train_geometry(self.image_size, augment, rotation=self.rotation)
        if table.streaming:
            if training and self.recolour:
                raise ValueError(f"{source}: recolour needs a map-style dataset (a folder or file), not a stream")
            return self._streaming(table, image_col, text_col, label_col, geometry)
        table.data = self._drop_empty_captions(table, image_col, text_col, "train" if training else "validation")
        dataset = ImageTextDataset(table.data, image_col, text_col, label_col, table.root, geometry,
                                   self.bad_samples, self.seed, extra)
        recolour = T.RecolourView(self.recolour) if training and self.recolour else None
        if recolour is not None and extra:
            raise ValueError(f"{source}: recolour works on caption pairs, not question records")
        if not cache:
            dataset.recolour = recolour
            return dataset
        dataset = InMemoryImageTextDataset.from_dataset(
            dataset,
            self.cache_workers,
            # Not augmenting, resize + crop run once; pixels stay uint8 (4x less memory than floats) and each batch
            # is normalised in one vectorised call by the collate function.
            geometry=None if augment else eval_geometry(self.image_size),
            augment=train_geometry(self.image_size, True, rotation=self.rotation) if augment else None,
        )
        self._record("train" if training else "validation", dataset.skipped)
        if recolour is not None:
            dataset.set_recolour(recolour)
        dataset.pretokenize(self.tokenizer)
        return dataset

    def _drop_empty_captions(self, table: Table, image_col: str, text_col: str, split: str) -> Any:
        """Empty captions are known from the table alone: drop them before sampling, not at every epoch."""
        captions = table.data[text_col][:]
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
        if not bad:
            return table.data
        named = [str(table.data[i][image_col]) for i in bad[:_LOGGED_PATHS]]
        if self.bad_samples == "raise":
            raise ValueError(f"{table.source}: row {bad[0]} ({named[0]}) has an empty caption")
        self._record(split, [f"bad sample {name}: empty caption" for name in named], total=len(bad))
        bad_set = set(bad)
        return table.data.select([i for i in range(len(captions)) if i not in bad_set])

    def _streaming(self, table: Table, image_col: str, text_col: str, label_col: str | None, geometry: Any) -> Any:
        from datasets.distributed import split_dataset_by_node

        rank, world = self._rank()
        # By shard when the shard count divides the world size, else by example: either way each sample goes to
        # exactly one rank; Hugging Face then splits the rank's shards across its dataloader workers.
        data = split_dataset_by_node(table.data, rank=rank, world_size=world) if world > 1 else table.data
        return StreamingImageTextDataset(data, image_col, text_col, label_col, table.root, geometry,
                                         self.bad_samples)

    # ---------------------------------------------------------------------------------- bad samples
    def _record(self, split: str, messages: list[str], total: int | None = None) -> None:
        count = len(messages) if total is None else total
        if not count:
            return
        self.skipped[split] += count
        shown = messages[: max(0, _LOGGED_PATHS - self._logged)]
        self._logged += len(shown)
        details = "; ".join(shown)
        log.warning("skipped %d bad %s sample(s) (%d so far)%s", count, split, self.skipped[split],
                    f": {details}" if details else "")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "skipped" in batch:
            skipped = batch.pop("skipped")
            self._record(skipped["split"], skipped["messages"])
        return batch

    # ---------------------------------------------------------------------------------- loaders
    def _normalize(self) -> v2.Compose:
        return normalize(self.image_mean, self.image_std)

    def _collate(self, split: str) -> ImageTextCollate:
        return ImageTextCollate(self.tokenizer, self._normalize(), split, heldout=self.heldout_classnames)

    def _fitting_batch_size(self, size: int, batch_size: int) -> int:
        """``batch_size``, or the samples one rank gets when that is fewer (warned once): dropping the last
        incomplete batch of a set smaller than a batch would leave no training batch at all."""
        _, world = self._rank()
        per_rank = -(-size // world)  # the distributed sampler pads every rank to the same count
        if per_rank >= batch_size or per_rank == 0:
            return batch_size
        log.warning("training set of %d sample(s)%s is smaller than batch_size %d: training with batches of %d",
                    size, f" ({per_rank} per rank)" if world > 1 else "", batch_size, per_rank)
        return per_rank

    def _loader(self, dataset: Any, batch_size: int, training: bool) -> DataLoader:
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        if training and not iterable:
            batch_size = self._fitting_batch_size(len(dataset), batch_size)
            # Epoch order fixed by (seed, epoch) and a state Lightning checkpoints: resuming mid-epoch neither
            # repeats nor skips a sample.
            return ResumableDataLoader(
                dataset,
                batch_size=batch_size,
                sampler=EpochSampler(len(dataset), shuffle=True, seed=self.seed),
                drop_last=self.drop_last,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
                collate_fn=self._collate("train"),
                position=self._trained_batches,
            )
        # Streams can give ranks different batch counts; EqualBatchesDataLoader stops all ranks together, and skips
        # the batches of the epoch already trained on when a run resumes.
        loader_class = EqualBatchesDataLoader if iterable else DataLoader
        extra = {"position": self._trained_batches} if iterable and training else {}
        return loader_class(
            dataset,
            batch_size=batch_size,
            shuffle=training and not iterable,
            drop_last=training and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0 and not iterable,
            collate_fn=self._collate("train" if training else "validation"),
            **extra,
        )

    def _trained_batches(self) -> int:
        """Batches of the current epoch already trained on, per the trainer's progress (0 without a trainer)."""
        if self.trainer is None:
            return 0
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        # Saved after a step finished: it counts. Saved mid-step: Lightning redoes that batch on restart.
        return progress.processed if progress.processed == progress.ready else progress.completed

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: no training data (set train=...)")
        return self._loader(self.train_dataset, self.batch_size, training=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, training=False)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    # ---------------------------------------------------------------------------------- classes
    def _class_file(self, name: str) -> Path | None:
        for source in (self.val, self.train):
            if source is None:
                continue
            path = Path(source)
            for folder in (path, path.parent):
                if (folder / name).is_file():
                    return folder / name
        return None

    @property
    def classnames(self) -> list[str]:
        """Zero-shot classes: ``classnames.txt`` next to the splits, else the sorted validation labels."""
        path = self._class_file("classnames.txt")
        if path is not None:
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        dataset = self.val_dataset
        if dataset is None and self.val is not None:
            table = load_table(self.val, self.val_split, self.image_column, self.hub_config, self.streaming)
            if not table.streaming and self.label_column in table.data.column_names:
                return sorted({str(v) for v in table.data[self.label_column][:] if v is not None and str(v).strip()})
            return []
        if isinstance(dataset, InMemoryImageTextDataset):
            return sorted({label for label in dataset.labels if label})
        if isinstance(dataset, ImageTextDataset) and dataset.label_column:
            return sorted({str(v) for v in dataset.table[dataset.label_column][:] if v is not None and str(v).strip()})
        return []

    @property
    def heldout_classnames(self) -> list[str]:
        """Classes never seen in training (``heldout.txt`` next to the splits), or empty; batches flag them."""
        path = self._class_file("heldout.txt")
        if path is None:
            return []
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["ImageTextDataModule", "Tokenizer"]
