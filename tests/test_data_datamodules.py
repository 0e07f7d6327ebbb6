"""ImageTextDataModule: the batch contract, sources (the built-in shapes too), bad data, Lightning integration."""

from __future__ import annotations

import json
import logging
import shutil

import lightning.pytorch as pl
import pytest
import torch

from vlm.data import shapes as S
from vlm.data.builtin import ShapesSource
from vlm.data.datamodules import ImageTextDataModule
from vlm.data.datasets import BadSampleError
from vlm.data.images import load_image
from vlm.data.tokenizer import CLIPTokenizer
from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, eval_transform

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer(16)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    S.generate_shapes(root, train=64, val=36, seed=0, image_size=32, processes=1)
    return root


def _module(cls=ImageTextDataModule, **kwargs):
    defaults = dict(tokenizer=CLIPTokenizer(16), image_size=16, image_mean=MEAN, image_std=STD, batch_size=8)
    defaults.update(kwargs)
    return cls(**defaults)


def _check_batch(batch, tokenizer, size=8, image_size=16):
    assert set(batch) - {"heldout"} == {"image", "text", "caption", "label", "path"}
    if "heldout" in batch:  # where the data has held-out classes: one flag per sample, from its label
        assert batch["heldout"] == [label in S.HELD_OUT_CLASSNAMES for label in batch["label"]]
    assert batch["image"].shape == (size, 3, image_size, image_size) and batch["image"].dtype == torch.float32
    assert len(batch["caption"]) == len(batch["label"]) == len(batch["path"]) == size
    assert torch.equal(batch["text"], tokenizer.encode_batch(batch["caption"])["text"])
    for i in (0, size - 1):  # pixels equal the evaluation transform of the file
        expected = eval_transform(image_size, MEAN, STD)(load_image(batch["path"][i]))
        # Both run the same uint8 geometry, then the same elementwise float32 operations (scale, subtract, divide),
        # each correctly rounded on every CPU: the pixels are bit-identical, one image or a batch.
        assert torch.equal(batch["image"][i], expected)


@pytest.mark.parametrize("in_memory", [False, True])
def test_batch_contract(shapes_root, tokenizer, in_memory):
    dm = _module(train=str(shapes_root / "train"), val=str(shapes_root / "validation"), in_memory=in_memory)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 8  # 64 / 8, drop_last
    _check_batch(train[0], tokenizer)
    assert train[0]["heldout"] == [False] * 8  # held-out classes never appear in training
    val = list(dm.val_dataloader())
    assert sum(len(b["path"]) for b in val) == 36
    flags = [(label, flag) for b in val for label, flag in zip(b["label"], b["heldout"])]
    assert [flag for _, flag in flags] == [label in S.HELD_OUT_CLASSNAMES for label, _ in flags]
    assert sum(flag for _, flag in flags) == 6  # the 36 images start with each class in turn
    rows = {r["file_name"]: r for r in map(json.loads, (shapes_root / "validation" / "metadata.jsonl").open())}
    for batch in val:
        for path, caption, label in zip(batch["path"], batch["caption"], batch["label"]):
            row = rows[path.rsplit("/", 1)[1]]
            assert (caption, label) == (row["caption"], row["label"])
    assert dm.classnames == list(S.CLASSNAMES)
    assert dm.heldout_classnames == list(S.HELD_OUT_CLASSNAMES)


def test_csv_and_jsonl_sources_and_label_fallback(shapes_root, tokenizer, tmp_path):
    rows = [json.loads(line) for line in (shapes_root / "validation" / "metadata.jsonl").open()][:12]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("path,text\n" + "".join(f"{shapes_root / 'validation' / r['file_name']},{r['caption']}\n"
                                                 for r in rows))
    dm = _module(train=str(csv_path), val=str(csv_path), image_column="path", text_column="text", label_column=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    _check_batch(batch, tokenizer)
    assert batch["label"] == [""] * 8 and "heldout" not in batch  # no heldout.txt: no flags
    jsonl = tmp_path / "pairs.jsonl"  # relative paths are relative to the file
    shutil.copytree(shapes_root / "validation", tmp_path / "imgs")
    jsonl.write_text("".join(json.dumps({"image": f"imgs/{r['file_name']}", "caption": r["caption"],
                                         "label": r["label"]}) + "\n" for r in rows))
    dm = _module(train=str(jsonl), val=str(jsonl))
    dm.setup("fit")
    _check_batch(next(iter(dm.train_dataloader())), tokenizer)
    assert dm.classnames == sorted({r["label"] for r in rows})
    assert dm.heldout_classnames == []


def test_missing_source_and_no_tokenizer_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such dataset file or directory"):
        _module(train=str(tmp_path / "nope.csv")).setup("fit")
    with pytest.raises(ValueError, match="without metadata.jsonl"):
        _module(train=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="no tokenizer"):
        ImageTextDataModule(train=str(tmp_path)).setup("fit")


def _corrupt(root, tmp_path):
    """A copy of the training split with 5 bad rows out of 64: truncated, zero-byte, text, missing, no caption."""
    train = tmp_path / "train"
    shutil.copytree(root / "train", train)
    (train / "00003.png").write_bytes((train / "00003.png").read_bytes()[:200])
    (train / "00010.png").write_bytes(b"")
    (train / "00020.png").write_text("not a png")
    (train / "00030.png").unlink()
    rows = [json.loads(line) for line in (train / "metadata.jsonl").open()]
    rows[40]["caption"] = "  "
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, {"00003.png", "00010.png", "00020.png", "00030.png", "00040.png"}


@pytest.mark.parametrize("in_memory", [False, True])
def test_bad_samples_are_skipped_counted_and_replaced(shapes_root, tmp_path, caplog, in_memory):
    train, bad = _corrupt(shapes_root, tmp_path)
    dm = _module(train=str(train), in_memory=in_memory, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="vlm.data"):
        dm.setup("fit")
        seen = []
        for batch in dm.train_dataloader():
            batch = dm.on_before_batch_transfer(batch, 0)
            assert len(batch["path"]) == 8 and batch["image"].shape[0] == 8  # never a smaller batch
            seen += [p.rsplit("/", 1)[1] for p in batch["path"]]
    assert not bad & set(seen)
    assert dm.skipped["train"] == 5
    logged = caplog.text
    assert "empty caption" in logged and "00040.png" in logged
    assert sum(name in logged for name in bad) >= 3  # the first few bad files are named
    # Empty captions are dropped up front (63 rows); in memory the unreadable files too (59 rows); either way
    # 7 full batches. From disk, an unreadable file is replaced by another row when it is drawn.
    assert len(seen) == 56


@pytest.mark.parametrize("in_memory", [False, True])
def test_bad_samples_raise_policy_names_the_file(shapes_root, tmp_path, in_memory):
    train, _ = _corrupt(shapes_root, tmp_path)
    rows = [json.loads(line) for line in (train / "metadata.jsonl").open()]
    rows[40]["caption"] = "fine again"
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = _module(train=str(train), in_memory=in_memory, bad_samples="raise")
    with pytest.raises(BadSampleError, match=r"0000[3]\.png: truncated image data"):
        dm.setup("fit")
        for _ in dm.train_dataloader():
            pass
    rows[40]["caption"] = ""
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="00040.png.*empty caption"):
        _module(train=str(train), in_memory=in_memory, bad_samples="raise").setup("fit")


class _StandInTask(pl.LightningModule):
    """A task checking each batch it gets."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        assert "skipped" not in batch and batch["image"].shape[1:] == (3, 16, 16)
        self.sizes.append(batch["image"].shape[0])
        return (self.weight * batch["image"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        assert batch["text"].shape[1] == 16

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _shapes(root, **source):
    """The data module over the built-in shapes in ``root`` (generated on first use), as the shapes configs build it."""
    return ImageTextDataModule(source=ShapesSource(data_dir=str(root), **source), in_memory=True, cache_workers=0,
                               tokenizer=CLIPTokenizer(16), image_size=16, image_mean=MEAN, image_std=STD,
                               batch_size=16)


def test_shapes_source_under_a_trainer(tmp_path):
    root = tmp_path / "shapes"
    dm = _shapes(root, num_train=40, num_val=36, image_size=32)
    task = _StandInTask()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    assert S.is_complete(root) and task.sizes == [16, 16]  # 40 images, drop_last: two full batches
    assert dm.classnames == list(S.CLASSNAMES) and dm.heldout_classnames == list(S.HELD_OUT_CLASSNAMES)
    # The source writes exactly what `vlm data shapes` writes for the same settings.
    S.generate_shapes(tmp_path / "cli", train=40, val=36, seed=0, image_size=32, processes=1)
    for name in ("train/00007.png", "validation/00011.png", "train/metadata.jsonl", "info.json"):
        assert (root / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    # prepare_data never regenerates existing data.
    stamp = (root / "train" / "00000.png").stat().st_mtime_ns
    _shapes(root, num_train=99).prepare_data()
    assert (root / "train" / "00000.png").stat().st_mtime_ns == stamp
    assert len((root / "train" / "metadata.jsonl").read_text().splitlines()) == 40
    # ... but refuses data generated for another scene distribution, naming the setting, and leaves it as it was.
    with pytest.raises(ValueError, match=r"two_object_prob=0.25 \(config: 0.0\)"):
        _shapes(root, two_object_prob=0.0).prepare_data()
    with pytest.raises(ValueError, match=r"seed=0 \(config: 3\)"):
        _shapes(root, seed=3).prepare_data()
    info = json.loads((root / "info.json").read_text())
    (root / "info.json").write_text(json.dumps({**info, "sizes": {"small": 0.25, "large": 0.45}}))  # older data
    with pytest.raises(ValueError, match=r"sizes=\{'small': 0.25"):
        _shapes(root).prepare_data()
    assert (root / "train" / "00000.png").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="either a source or train"):
        ImageTextDataModule(source=ShapesSource(str(root)), train=str(root / "train"))


def test_the_data_module_never_reads_the_task(shapes_root, tmp_path):
    """Tokenizer and image settings are the data module's own arguments (``vlm fit`` links the task's): a task that
    has them does not stand in for missing ones."""
    task = _StandInTask()
    task.tokenizer, task.image_size = CLIPTokenizer(16), 16
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="no tokenizer"):
        trainer.fit(task, datamodule=ImageTextDataModule(train=str(shapes_root / "train"), batch_size=8))
    dm = ImageTextDataModule(train=str(shapes_root / "train"), batch_size=8, tokenizer=CLIPTokenizer(16))
    assert (dm.image_size, dm.image_mean, dm.image_std) == (224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # CLIP's


def test_training_runs_to_the_end_over_bad_samples(shapes_root, tmp_path):
    """Issue 6: with ~8% truncated / empty / non-image / missing files and empty captions, a real fit finishes."""
    import lightning as L
    from conftest import build_trainable, tiny_clip_config

    train, _ = _corrupt(shapes_root, tmp_path)
    task = build_trainable(tiny_clip_config())
    dm = ImageTextDataModule(train=str(train), batch_size=8, tokenizer=task.tokenizer, image_size=task.image_size,
                             image_mean=task.image_mean, image_std=task.image_std)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 7  # every full batch of the epoch was trained on
    assert dm.skipped["train"] == 5


def test_vlm_fit_on_a_stale_data_folder_is_one_line_and_exit_2(tmp_path, capsys):
    """A folder generated by another config (here: with two-object scenes, the CLIP config asks for none) stops
    ``vlm fit`` before training with one line naming the setting, not a traceback; the folder is left as it was."""
    from pathlib import Path

    from vlm.__main__ import main as vlm_main

    root = tmp_path / "shapes"
    S.generate_shapes(root, train=40, val=36, seed=0, image_size=32, processes=1, two_object_prob=0.25)
    before = (root / "train" / "metadata.jsonl").read_bytes()
    config = Path(__file__).parent.parent / "configs" / "clip" / "shapes.yaml"
    code = vlm_main(["fit", "--config", str(config), f"--data.init_args.source.init_args.data_dir={root}",
                     f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"vlm: error: {root} was generated with two_object_prob=0.25 (config: 0.0)" in err
    assert "Traceback" not in err
    assert (root / "train" / "metadata.jsonl").read_bytes() == before
