"""Issue 28, "see why it fails": per-attribute zero-shot accuracy in the contrastive task's validation logs
(``val/attribute{k}_top1``) and ``curves.png`` drawn by :class:`vlm.callbacks.TrainingCurves` beside metrics.csv."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import build_trainable, tiny_clip_config
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from vlm.callbacks import TrainingCurves, plot_curves
from vlm.data.datamodules import ImageTextDataModule
from vlm.metrics import attribute_top1
from vlm.zero_shot import build_classifier

ROOT = Path(__file__).parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["red circle", "blue circle", "red square", "blue square"]


# ------------------------------------------------------------------------------------------ the metric
def _logits(predicted: list[int], classes: int) -> torch.Tensor:
    """Scores whose top-1 class is ``predicted[i]`` for image i."""
    logits = torch.zeros(len(predicted), classes)
    logits[torch.arange(len(predicted)), torch.tensor(predicted)] = 1.0
    return logits


def test_attribute_top1_on_hand_made_predictions():
    # (predicted, true) by index into CLASSES; -1: a label outside the classes, left out
    predicted = [0, 1, 2, 3, 2, 0, 1]
    target = [0, 0, 0, 3, 1, -1, 3]
    # image 0: red circle as red circle  -> colour right, shape right
    # image 1: blue circle as red circle -> colour wrong, shape right
    # image 2: red square as red circle  -> colour right, shape wrong
    # image 3: blue square as blue square -> both right
    # image 4: red square as blue circle -> both wrong
    # image 5: left out
    # image 6: blue circle as blue square -> colour right, shape wrong
    got = attribute_top1(_logits(predicted, 4), torch.tensor(target), CLASSES)
    assert got == {"attribute1_top1": 4 / 6, "attribute2_top1": 3 / 6}


def test_attribute_top1_is_empty_without_multi_word_classes():
    assert attribute_top1(_logits([0, 1], 2), torch.tensor([0, 0]), ["cat", "dog"]) == {}
    assert attribute_top1(_logits([0], 4), torch.tensor([-1]), CLASSES) == {}  # no labelled image: nothing to log


# ------------------------------------------------------------------------------------------ a tiny real fit
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _class_folders(root: Path) -> Path:
    """``root/<colour>_<shape>/{0,1}.png``: a coloured disc or square on black."""
    for name in CLASSES:
        colour, shape = name.split()
        (root / name.replace(" ", "_")).mkdir(parents=True)
        for i in range(2):
            image = Image.new("RGB", (16, 16))
            for x in range(16):
                for y in range(16):
                    inside = (x - 8) ** 2 + (y - 8) ** 2 < 30 if shape == "circle" else 3 <= x < 13 and 3 <= y < 13
                    if inside:
                        image.putpixel((x, y), tuple(c - 40 * i for c in COLOURS[colour]))
            image.save(root / name.replace(" ", "_") / f"{i}.png")
    return root


def _fit(tmp_path: Path, **trainer_kwargs) -> tuple[L.Trainer, L.LightningModule, ImageTextDataModule]:
    torch.manual_seed(0)
    task = build_trainable(tiny_clip_config())
    folders = _class_folders(tmp_path / "data")
    dm = ImageTextDataModule(train=str(folders), val=str(folders), caption_template="a {}", batch_size=4,
                             tokenizer=task.tokenizer, image_size=task.image_size, image_mean=task.image_mean,
                             image_std=task.image_std)
    kwargs = {"max_epochs": 1, "log_every_n_steps": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
              "enable_model_summary": False, "enable_checkpointing": False, "accelerator": "cpu", "devices": 1,
              "logger": CSVLogger(tmp_path / "logs"), "callbacks": [TrainingCurves()], **trainer_kwargs}
    trainer = L.Trainer(default_root_dir=tmp_path, **kwargs)
    trainer.fit(task, datamodule=dm)
    return trainer, task, dm


def _rows(metrics_csv: Path) -> list[dict[str, str]]:
    with open(metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


def _assert_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > min_bytes  # drawn panels, not an empty canvas
    with Image.open(path) as image:
        image.verify()


def test_fit_logs_attribute_accuracy_and_writes_curves_beside_metrics_csv(tmp_path):
    trainer, task, dm = _fit(tmp_path, val_check_interval=1)  # one epoch of 2 steps, validated after each
    log_dir = Path(trainer.logger.log_dir)
    rows = _rows(log_dir / "metrics.csv")
    _assert_png(log_dir / "curves.png")
    with Image.open(log_dir / "curves.png") as image:
        assert image.size == (1500, 400)  # three panels (loss, accuracy, retrieval recall), 5 x 4 inches each

    # Every image of the validation set predicted by hand, with the weights the last validation ran with.
    task.eval()
    with torch.no_grad():
        classifier = build_classifier(task.model, task.tokenizer, dm.classnames, task.resolved_templates())
        pairs = []
        for batch in dm.val_dataloader():
            best = (task.model.encode_image(batch["image"]) @ classifier.T).argmax(dim=1).tolist()
            pairs += [(dm.classnames[b], true) for b, true in zip(best, batch["label"])]
    assert len(pairs) == 8
    colour = sum(p.split()[0] == t.split()[0] for p, t in pairs) / 8
    shape = sum(p.split()[1] == t.split()[1] for p, t in pairs) / 8
    top1 = sum(p == t for p, t in pairs) / 8
    assert trainer.callback_metrics["val/attribute1_top1"].item() == pytest.approx(colour)
    assert trainer.callback_metrics["val/attribute2_top1"].item() == pytest.approx(shape)
    assert trainer.callback_metrics["val/zero_shot_top1"].item() == pytest.approx(top1)

    validated = [r for r in rows if r.get("val/attribute1_top1")]
    assert [int(r["step"]) for r in validated] == [0, 1]
    assert float(validated[-1]["val/attribute1_top1"]) == pytest.approx(colour)
    assert float(validated[-1]["val/attribute2_top1"]) == pytest.approx(shape)
    assert "val/attribute3_top1" not in rows[0]  # two-word classes: two attributes


def test_a_failing_plot_does_not_fail_the_fit(tmp_path, monkeypatch, caplog):
    from matplotlib.figure import Figure

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", broken)
    with caplog.at_level(logging.WARNING, logger="vlm.callbacks"):
        trainer, _, _ = _fit(tmp_path)
    assert trainer.global_step == 2 and trainer.state.finished
    log_dir = Path(trainer.logger.log_dir)
    assert (log_dir / "metrics.csv").is_file() and not (log_dir / "curves.png").exists()
    assert any("could not write" in r.getMessage() and "disk on fire" in r.getMessage() for r in caplog.records)


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"image": torch.randn(3, 16, 16), "text": torch.randint(1, 400, (16,))}


class _StopAfter(L.Callback):
    """Stops training after ``steps`` steps: by ``should_stop`` (as EarlyStopping does) or by raising."""

    def __init__(self, steps: int, raise_error: bool) -> None:
        self.steps, self.raise_error = steps, raise_error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.raise_error and trainer.global_step == self.steps:  # the steps before logged
            raise RuntimeError("stopped")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.raise_error and trainer.global_step == self.steps:
            trainer.should_stop = True


@pytest.mark.parametrize("raise_error", [False, True], ids=["should_stop", "exception"])
def test_curves_are_drawn_when_training_stops_early(tmp_path, raise_error):
    torch.manual_seed(0)
    task = build_trainable(tiny_clip_config())
    trainer = L.Trainer(max_steps=100, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                        callbacks=[TrainingCurves(), _StopAfter(2, raise_error)])
    loader = torch.utils.data.DataLoader(_Pairs(), batch_size=4)
    if raise_error:
        with pytest.raises(RuntimeError, match="stopped"):
            trainer.fit(task, loader)
    else:
        trainer.fit(task, loader)
    assert trainer.global_step == 2
    log_dir = Path(trainer.logger.log_dir)
    assert [r["step"] for r in _rows(log_dir / "metrics.csv") if r.get("train/loss")] == ["0", "1"]
    _assert_png(log_dir / "curves.png", min_bytes=5_000)


def test_without_a_csv_logger_the_curves_are_skipped_with_one_line(tmp_path, caplog):
    torch.manual_seed(0)
    task = build_trainable(tiny_clip_config())
    trainer = L.Trainer(max_steps=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                        callbacks=[TrainingCurves()])
    with caplog.at_level(logging.INFO, logger="vlm.callbacks"):
        trainer.fit(task, torch.utils.data.DataLoader(_Pairs(), batch_size=4))
    lines = [r.getMessage() for r in caplog.records if r.name == "vlm.callbacks"]
    assert len(lines) == 1 and "no CSVLogger" in lines[0]
    assert not list(tmp_path.rglob("*.png"))


# ------------------------------------------------------------------------------------------ the picture alone
def test_plot_curves_draws_one_panel_per_group(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,train/temperature,val/loss,val/perplexity\n"
                       "0,0,2.0,0.07,,\n0,1,1.5,0.07,,\n0,1,,,1.7,5.4\n")
    plot_curves(metrics, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (1000, 400)  # loss, other validation metrics; train/temperature is not drawn
    metrics.write_text("epoch,step,train/temperature\n0,0,0.07\n")
    with pytest.raises(ValueError, match="no train/loss or val"):
        plot_curves(metrics, tmp_path / "none.png")


@pytest.mark.parametrize("filename", ["../curves.png", "sub/curves.png", "curves.jpg", ".png", ""])
def test_the_picture_name_is_a_plain_png_name(filename):
    with pytest.raises(ValueError, match="plain file name"):
        TrainingCurves(filename)


# ------------------------------------------------------------------------------------------ the shipped configs
CONFIGS = sorted(p for folder in ("clip", "lm", "flamingo") for p in (ROOT / "configs" / folder).glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_with_callbacks_draws_curves(config):
    callbacks = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("callbacks")
    if callbacks is None:
        assert config.name == "shapes_scenes.yaml"  # composed with clip/shapes.yaml, whose callbacks it keeps
        return
    assert [c["class_path"] for c in callbacks].count("vlm.callbacks.TrainingCurves") == 1
