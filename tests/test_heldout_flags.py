"""Held-out flags travel in the batch: the collate flags each labelled sample (a question row keeps its own flag), and
the tasks split their held-out / seen accuracies by those flags, never by asking the data module."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_FLAMINGO

from vlm.data.datasets import ImageTextCollate
from vlm.data.gpt2_tokenizer import FlamingoTokenizer
from vlm.data.tokenizer import CLIPTokenizer
from vlm.formats import build_task
from vlm.metrics import zero_shot_accuracy
from vlm.zero_shot import build_classifier, class_logits

CLASSES = ["red circle", "blue square", "green triangle"]


def _sample(label: str, **extra) -> dict:
    return {"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "caption": f"a {label}", "label": label,
            "path": f"{label}.png", "skipped": [], **extra}


def _collate(tokenizer, heldout=None) -> ImageTextCollate:
    return ImageTextCollate(tokenizer, lambda x: x.float(), "validation", heldout=heldout)


# ------------------------------------------------------------------------------------------------- the collate
def test_the_collate_flags_each_sample_whose_label_is_held_out():
    samples = [_sample("red circle"), _sample("blue square"), _sample(""), _sample("blue square")]
    batch = _collate(CLIPTokenizer(16), heldout=["blue square", "green star"])(samples)
    assert batch["heldout"] == [False, True, False, True]
    assert batch["label"] == ["red circle", "blue square", "", "blue square"]
    for none in (None, []):  # no class names: no key, the batch of before
        assert "heldout" not in _collate(CLIPTokenizer(16), heldout=none)(samples)


def test_a_question_rows_own_flag_wins_over_the_class_names():
    tok = FlamingoTokenizer(context_length=48, vocab_offset=50257)
    samples = [_sample("blue square", question="what shape?", answers=["square"], heldout=False),
               _sample("red circle", question="what colour?", answers=["red"], heldout=True),
               _sample("red circle", question="what shape?", answers=["circle"], heldout=None)]
    batch = _collate(tok, heldout=["blue square"])(samples)
    assert batch["heldout"] == [False, True, None]  # the rows' flags as they are, not the labels' membership
    assert batch["answers"] == [["square"], ["red"], ["circle"]]


# --------------------------------------------------------------------------------------------------- the metric
def test_zero_shot_accuracy_splits_by_the_per_image_flags_and_drops_unlabelled_images():
    logits = torch.tensor([[5.0, 0.0, 1.0], [0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    target = torch.tensor([0, 0, 0, 2, -1])  # hits: yes, no, yes, yes; the last has no class
    heldout = torch.tensor([True, True, False, False, True])
    out = zero_shot_accuracy(logits, target, heldout)
    assert out == {"zero_shot_top1": pytest.approx(0.75), "zero_shot_top1_heldout": pytest.approx(0.5),
                   "zero_shot_top1_seen": pytest.approx(1.0)}
    assert zero_shot_accuracy(logits, target) == {"zero_shot_top1": pytest.approx(0.75)}  # no flags: no split
    only_seen = zero_shot_accuracy(logits, target, torch.tensor([False, False, False, False, True]))
    assert "zero_shot_top1_heldout" not in only_seen and only_seen["zero_shot_top1_seen"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one flag per target"):
        zero_shot_accuracy(logits, target, heldout[:3])


# ----------------------------------------------------------------------------------------------- contrastive
class _ClassesOnly(pl.LightningDataModule):
    """Validation batches made by hand, and zero-shot classes; no ``heldout_classnames`` at all."""

    classnames = CLASSES

    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.batches = batches

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


def _validate(task, batches: list[dict], tmp_path) -> dict[str, float]:
    dm = _ClassesOnly(batches)
    assert not hasattr(dm, "heldout_classnames")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    (metrics,) = trainer.validate(task, datamodule=dm, verbose=False)
    return metrics


def test_contrastive_validation_splits_zero_shot_accuracy_by_the_batches_flags(tiny_clip_task, tmp_path):
    task = tiny_clip_task.eval()
    g = torch.Generator().manual_seed(7)
    images = torch.randn(9, 3, 16, 16, generator=g)
    # Images 0-3 flagged held out (one right), 4-7 seen (three right), 8 has a label outside the classes (flagged,
    # but dropped). The flags ignore the class names on purpose: a class is flagged in one image and not in another.
    right = [True, False, False, False, True, True, True, False]
    flags = [True, True, True, True, False, False, False, False, True]
    classifier = build_classifier(task.model, task.tokenizer, CLASSES, task.resolved_templates(), task.template_pooling)
    batches = []
    for part in (slice(0, 5), slice(5, 9)):
        text = task.tokenizer.encode_batch(["a shape"] * len(images[part]))["text"]
        with torch.no_grad():
            pred = class_logits(task.encode(images[part], text)[0], classifier, task.model.logit_scale).argmax(1)
        labels = []
        for i, p in zip(range(9)[part], pred.tolist()):
            labels.append("purple hexagon" if i == 8 else CLASSES[p if right[i] else (p + 1) % len(CLASSES)])
        batches.append({"image": images[part], "text": text, "label": labels, "heldout": flags[part]})
    metrics = _validate(task, batches, tmp_path)
    assert metrics["val/zero_shot_top1"] == pytest.approx(0.5)
    assert metrics["val/zero_shot_top1_heldout"] == pytest.approx(0.25)
    assert metrics["val/zero_shot_top1_seen"] == pytest.approx(0.75)
    # The same batches without flags: overall accuracy only.
    metrics = _validate(task, [{k: v for k, v in b.items() if k != "heldout"} for b in batches], tmp_path)
    assert metrics["val/zero_shot_top1"] == pytest.approx(0.5)
    assert not any(k.startswith(("val/zero_shot_top1_heldout", "val/zero_shot_top1_seen")) for k in metrics)


# -------------------------------------------------------------------------------------------------- captioning
def test_captioning_validation_splits_attribute_accuracy_by_the_batches_flags():
    task = build_task(copy.deepcopy(TINY_FLAMINGO)).eval()
    refs = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"]
    preds = ["a red circle", "a red square", "a green triangle", "a red square", "a blue star"]  # right: 0, 2, 3
    task.generate_captions = lambda images, *args, **kwargs: preds[: len(images)]
    logged = {}
    task.log = lambda name, value, **kwargs: logged.__setitem__(name, value)

    def run(batch):
        logged.clear()
        task.on_validation_epoch_start()
        with torch.no_grad():
            task.validation_step(batch, 0)
        task.on_validation_epoch_end()
        return logged

    batch = {"image": torch.randn(5, 3, 16, 16), "caption": refs, "label": [""] * 5,
             "heldout": [True, True, False, False, False], **task.tokenizer.encode_batch(refs)}
    metrics = run(batch)
    assert metrics["val/attribute_accuracy"] == pytest.approx(3 / 5)
    assert metrics["val/attribute_accuracy_heldout"] == pytest.approx(1 / 2)
    assert metrics["val/attribute_accuracy_seen"] == pytest.approx(2 / 3)
    del batch["heldout"]  # no flags: no split (the data module is never asked)
    metrics = run(batch)
    assert metrics["val/attribute_accuracy"] == pytest.approx(3 / 5)
    assert not any(k.startswith(("val/attribute_accuracy_heldout", "val/attribute_accuracy_seen")) for k in metrics)
