"""Issue 28, "your data as you have it" and "see why it fails": class sub-folders as a dataset, one error line for a
folder in no layout, a dataset smaller than one batch that still trains, per-attribute accuracy and the confusion
matrix PNG of scripts/zero_shot.py."""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import tiny_clip_config
from PIL import Image

from vlm.data.datamodules import ImageTextDataModule
from vlm.data.sources import DataLayoutError, folder_label, load_table
from vlm.data.tokenizer import CLIPTokenizer
from vlm.metrics import attribute_accuracy, confusion_matrix, label_attributes

ROOT = Path(__file__).parent.parent
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


def _class_folders(root: Path, per_class: int = 2) -> Path:
    """``root/{red_circle, blue-square, red_square}/*.png`` (a hyphen and underscores), plus a stray text file and a
    hidden folder that must both be ignored."""
    for folder in ("red_circle", "blue-square", "red_square"):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 20), COLOURS[folder.split("_")[0].split("-")[0]]).save(root / folder / f"{i}.png")
    (root / "red_circle" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    Image.new("RGB", (20, 20)).save(root / ".cache" / "x.png")
    return root


def _module(**kwargs) -> ImageTextDataModule:
    return ImageTextDataModule(tokenizer=CLIPTokenizer(context_length=16), image_size=16, batch_size=4, **kwargs)


# ------------------------------------------------------------------------------------------ class sub-folders
def test_folder_label_turns_underscores_and_hyphens_into_spaces():
    assert folder_label("red_circle") == "red circle"
    assert folder_label("large-teal__triangle") == "large teal triangle"
    assert folder_label("seven") == "seven"


def test_class_folders_give_captions_through_the_template_and_sorted_labels(tmp_path):
    root = _class_folders(tmp_path / "train")
    dm = _module(train=str(root), val=str(root), caption_template="a {}")
    dm.setup("fit")
    table = dm.train_dataset.table
    assert len(table) == 6  # the text file and the hidden folder are not samples
    rows = sorted(zip(table["image"][:], table["caption"][:], table["label"][:]))
    assert rows == [("blue-square/0.png", "a blue square", "blue square"),
                    ("blue-square/1.png", "a blue square", "blue square"),
                    ("red_circle/0.png", "a red circle", "red circle"),
                    ("red_circle/1.png", "a red circle", "red circle"),
                    ("red_square/0.png", "a red square", "red square"),
                    ("red_square/1.png", "a red square", "red square")]  # fmt: skip
    assert dm.classnames == ["blue square", "red circle", "red square"]
    batch = next(iter(dm.train_dataloader()))  # the images load from the relative paths
    assert batch["image"].shape == (4, 3, 16, 16)
    assert set(batch["caption"]) <= {"a blue square", "a red circle", "a red square"}


def test_class_folder_captions_follow_the_task_templates_else_the_label(tmp_path):
    root = _class_folders(tmp_path / "train", per_class=1)

    def captions(dm: ImageTextDataModule) -> list[str]:
        dm.setup("fit")
        return sorted(set(dm.train_dataset.table["caption"][:]))

    assert captions(_module(train=str(root))) == ["blue square", "red circle", "red square"]  # no task: the label
    for templates, first in ((["a photo of a {}.", "a {}"], "a photo of a red circle."), ("auto", "a red circle")):
        dm = _module(train=str(root))
        dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(templates=templates), global_rank=0,
                                     world_size=1)
        assert first in captions(dm)
    # classnames (read without setup, as zero-shot validation may) are the folder labels
    assert _module(val=str(root)).classnames == ["blue square", "red circle", "red square"]


def test_a_bad_caption_template_is_refused_when_the_module_is_built():
    with pytest.raises(ValueError, match=r"\{\}"):
        _module(caption_template="a {name}")


# ------------------------------------------------------------------------------------------ no layout: one line
def test_a_folder_in_no_layout_raises_a_layout_error_naming_the_layouts(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme.txt").write_text("images went elsewhere")
    (tmp_path / "data" / "empty_class").mkdir()  # a sub-folder without images is not a class
    with pytest.raises(DataLayoutError) as info:
        load_table(str(tmp_path / "data"), "train")
    message = str(info.value)
    assert str(tmp_path / "data") in message
    assert "metadata.jsonl" in message and "class sub-folders" in message and "shards" in message
    assert "\n" not in message


def _fit_config(tmp_path: Path, train: Path, batch_size: int, max_steps: int = 1) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "vlm.callbacks.Checkpoint",
                                   "init_args": {"every_n_train_steps": 1, "save_top_k": 0}}]},
        "model": copy.deepcopy(tiny_clip_config()),
        "data": {"class_path": "vlm.data.datamodules.ImageTextDataModule",
                 "init_args": {"train": str(train), "batch_size": batch_size}},
    }  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_vlm_fit_on_a_folder_in_no_layout_is_one_error_line_and_exit_2(tmp_path, capsys):
    from vlm.__main__ import main

    data = tmp_path / "photos"
    data.mkdir()
    (data / "readme.txt").write_text("no images, no metadata")
    code = main(["fit", "--config", str(_fit_config(tmp_path, data, batch_size=4))])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("vlm: error:")]
    assert len(errors) == 1
    assert str(data) in errors[0] and "class sub-folders" in errors[0]
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# ------------------------------------------------------------------------------------------ smaller than a batch
def test_a_training_set_smaller_than_a_batch_trains_with_a_smaller_batch(tmp_path, caplog):
    root = _class_folders(tmp_path / "train", per_class=1)  # 3 images, batch_size 8
    task_config = tiny_clip_config()
    from conftest import build_trainable

    task = build_trainable(task_config)
    dm = ImageTextDataModule(train=str(root), batch_size=8, tokenizer=task.tokenizer, image_size=task.image_size,
                             image_mean=task.image_mean, image_std=task.image_std)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "run", accelerator="cpu", devices=1)
    with caplog.at_level(logging.WARNING, logger="vlm.data"):
        trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 1  # without the smaller batch: "No training batches" and no step at all
    warnings = [r.getMessage() for r in caplog.records if "smaller than batch_size" in r.getMessage()]
    assert warnings == ["training set of 3 sample(s) is smaller than batch_size 8: training with batches of 3"]
    trainer.save_checkpoint(tmp_path / "run" / "small.ckpt")
    assert (tmp_path / "run" / "small.ckpt").stat().st_size > 0


def test_vlm_fit_on_a_dataset_smaller_than_a_batch_writes_a_checkpoint(tmp_path, caplog):
    from vlm.__main__ import main

    root = _class_folders(tmp_path / "train", per_class=1)
    assert main(["fit", "--config", str(_fit_config(tmp_path, root, batch_size=16))]) == 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["global_step"] == 1
    assert "training set of 3 sample(s) is smaller than batch_size 16: training with batches of 3" in caplog.text


# ------------------------------------------------------------------------------------------ why it fails
LABELS = ["red circle", "blue circle", "red square", "blue square", "green"]


def test_label_attributes_group_words_by_position():
    assert label_attributes(LABELS) == [["red", "blue"], ["circle", "square"]]  # "green" has one word: no attribute
    assert label_attributes(["cat", "dog"]) == []


def test_attribute_accuracy_on_a_hand_made_example():
    pairs = [  # (predicted, true)
        ("red circle", "red circle"),  # colour right, shape right
        ("blue circle", "red circle"),  # colour wrong, shape right
        ("red square", "red circle"),  # colour right, shape wrong
        ("blue square", "blue square"),  # both right
        ("red circle", "blue square"),  # both wrong
        ("blue square", "red square"),  # colour wrong, shape right
        ("green", "red circle"),  # colour wrong ("green" != "red"), shape wrong (no second word)
        ("green", "green"),  # a one-word true label counts towards no attribute
    ]
    result = attribute_accuracy(pairs, LABELS)
    # colour right on images 1, 3, 4: 3 of 7; shape right on images 1, 2, 4, 6: 4 of 7
    assert result == [
        {"attribute": "attribute 1", "values": ["red", "blue"], "correct": 3, "total": 7, "accuracy": 3 / 7},
        {"attribute": "attribute 2", "values": ["circle", "square"], "correct": 4, "total": 7, "accuracy": 4 / 7},
    ]
    assert attribute_accuracy([("cat", "dog")], ["cat", "dog"]) == []


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels = ["red circle", "blue circle", "red square"]
    pairs = [("red circle", "red circle"), ("blue circle", "red circle"), ("red circle", "red circle"),
             ("red square", "blue circle"), ("purple", "red circle")]  # a label outside the set is left out
    assert confusion_matrix(pairs, labels) == [[2, 1, 0], [0, 0, 1], [0, 0, 0]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from vlm.formats import build_task

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": torch.randn(3, 16, 16), "text": torch.randint(1, 400, (16,))}

    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    task = build_task(tiny_clip_config())
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    trainer.fit(task, torch.utils.data.DataLoader(Pairs(), batch_size=4))
    trainer.save_checkpoint(out / "tiny.ckpt")
    return out / "tiny.ckpt"


def _zero_shot():
    sys.path.insert(0, str(ROOT / "scripts"))
    import zero_shot

    return zero_shot


def test_zero_shot_reports_attributes_and_writes_a_confusion_png(checkpoint, tmp_path, capsys):
    zero_shot = _zero_shot()
    root = _class_folders(tmp_path / "val")
    labels = "red circle,blue square,red square"
    folders = [str(root / name) for name in ("red_circle", "blue-square", "red_square")]
    png = tmp_path / "confusion.png"
    # the per-image predictions, to check the report against
    assert zero_shot.main(["--checkpoint", str(checkpoint), "--labels", labels, "--json", *folders]) == 0
    out, _ = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    pairs = [(r["predictions"][0]["label"], zero_shot.folder_truth([Path(r["path"])], labels.split(","))[
        Path(r["path"])]) for r in records]  # fmt: skip
    assert sorted(t for _, t in pairs) == sorted(["red circle", "blue square", "red square"] * 2)  # folder truth

    code = zero_shot.main(["--checkpoint", str(checkpoint), "--labels", labels, "--json", "--accuracy-only",
                           "--confusion", str(png), *folders])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip())
    colour_right = sum(p.split()[0] == t.split()[0] for p, t in pairs)
    shape_right = sum(p.split()[1] == t.split()[1] for p, t in pairs)
    assert report["labelled"] == 6 and report["correct"] == sum(p == t for p, t in pairs)
    assert [(a["attribute"], a["values"], a["correct"], a["total"]) for a in report["attributes"]] == [
        ("attribute 1", ["red", "blue"], colour_right, 6), ("attribute 2", ["circle", "square"], shape_right, 6)]

    assert zero_shot.main(["--checkpoint", str(checkpoint), "--labels", labels, "--accuracy-only", *folders]) == 0
    text = capsys.readouterr().out
    assert f"attribute 1 (red, blue) right: {colour_right / 6:.4f} ({colour_right}/6)" in text
    assert f"attribute 2 (circle, square) right: {shape_right / 6:.4f} ({shape_right}/6)" in text

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size == (400, 400)  # 3 labels: the smallest figure, 4 x 4 inches at 100 dpi


def test_zero_shot_refuses_a_confusion_path_in_a_missing_folder_before_loading(tmp_path, capsys):
    zero_shot = _zero_shot()
    with pytest.raises(SystemExit) as info:
        zero_shot.main(["--checkpoint", str(tmp_path / "none.ckpt"), "--labels", "a,b", "--confusion",
                        str(tmp_path / "no" / "such" / "c.png"), str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --confusion") and "Traceback" not in err
