"""The real handwritten digits: layout, held-out split, captions, and the source that writes them."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlm.__main__ import main as vlm_main
from vlm.data.builtin import DigitsSource
from vlm.data.datamodules import ImageTextDataModule
from vlm.data.digits import DIGIT_NAMES, load_sources
from vlm.data.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "digits"
    ImageTextDataModule(source=DigitsSource(data_dir=str(root), image_size=16)).prepare_data()
    return root


def _rows(root, split):
    return [json.loads(line) for line in (root / split / "metadata.jsonl").open()]


def test_layout_and_captions(digits_root):
    assert (digits_root / "classnames.txt").read_text().splitlines() == list(DIGIT_NAMES)
    train, val = _rows(digits_root, "train"), _rows(digits_root, "validation")
    assert len(train) + len(val) == 1797 + 5000
    for row in train[:50] + val[:50]:
        assert row["label"] == DIGIT_NAMES[row["digit"]]
        assert row["caption"] == f"a handwritten digit {row['label']}"
    for split, rows in (("train", train), ("validation", val)):
        assert [r["file_name"] for r in rows[:2]] == ["00000.png", "00001.png"]
        assert Image.open(digits_root / split / rows[-1]["file_name"]).size == (16, 16)
    info = json.loads((digits_root / "info.json").read_text())
    assert info["train"] == len(train) and info["validation"] == len(val)


def test_validation_is_held_out_and_stratified(digits_root):
    train, val = _rows(digits_root, "train"), _rows(digits_root, "validation")
    ids = lambda rows: {(r["source"], r["source_index"]) for r in rows}  # noqa: E731
    assert not ids(train) & ids(val)  # no image in both splits
    for source, total in (("sklearn", 1797), ("mnist", 5000)):
        share = sum(r["source"] == source for r in val) / total
        assert abs(share - 0.2) < 0.01
    counts = Counter(r["label"] for r in val)
    assert set(counts) == set(DIGIT_NAMES) and min(counts.values()) > 100


def test_stored_pixels_are_the_source_digits(digits_root):
    sources = {name: (images, labels) for name, images, labels in load_sources()}
    row = next(r for r in _rows(digits_root, "train") if r["source"] == "mnist")
    images, labels = sources["mnist"]
    assert labels[row["source_index"]] == row["digit"]
    stored = np.asarray(Image.open(digits_root / "train" / row["file_name"]).resize((28, 28)), dtype=float)
    original = images[row["source_index"]].astype(float)
    assert np.corrcoef(stored.ravel(), original.ravel())[0, 1] > 0.9  # white ink on black, same digit


def test_cli_and_data_module(digits_root, tmp_path, capsys):
    dm = ImageTextDataModule(source=DigitsSource(data_dir=str(digits_root)), tokenizer=CLIPTokenizer(8),
                             image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, batch_size=32, in_memory=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 3, 16, 16) and set(batch["label"]) <= set(DIGIT_NAMES)
    assert dm.classnames == list(DIGIT_NAMES) and dm.heldout_classnames == []
    assert vlm_main(["data", "digits", "--out", str(tmp_path), "--val-fraction", "1.5"]) == 1
    assert "val_fraction must be in (0, 1)" in capsys.readouterr().err
