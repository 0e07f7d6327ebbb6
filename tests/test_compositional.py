"""Compositional supervision from captions (vlm.prompts, ContrastiveTask(attribute_positives, compose_text)): what
becomes a positive and a negative on hand-made captions, the templates derived from them, and the loss being exact
under micro-batch accumulation and under 2-process DDP.

Gradient comparisons run in float64, as in tests/test_contrastive_accumulation.py: the sums are taken in another
order, and only in float64 is that rounding far below any real error (a lost term, a wrong normaliser).

Also a script: ``python tests/test_compositional.py OUT K`` runs one DDP step (2 CPU processes) with ``K``
micro-batches and saves each rank's gradients (see the test).
"""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import build_trainable, tiny_clip_config
from ddp_contrastive import SaveGrads
from test_contrastive_accumulation import _assert_same_grads

from vlm.formats import build_task
from vlm.prompts import attribute_phrases, attribute_targets, caption_frame, derive_templates, recombined_captions

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

CAPTIONS = ["a large red circle", "a small blue square", "a large red square", "a small green circle",
            "a large blue circle", "a small red circle", "a large green square", "a small blue circle"]  # fmt: skip
LABELS = [c.split(" ", 2)[2] for c in CAPTIONS]


# ------------------------------------------------------------------------------------------ construction
def test_frame_is_the_caption_around_its_label_as_whole_words():
    assert caption_frame("a large teal triangle", "teal triangle") == "a large {}"
    assert caption_frame("a  photo of  red brick", "red brick") == "a photo of {}"  # spacing normalised
    assert caption_frame("a redder square", "red square") is None  # not whole words
    assert caption_frame("a red circle", "blue circle") is None
    assert caption_frame("a {x} red circle", "red circle") == "a {{x}} {}"  # literal braces escaped
    assert caption_frame("a red circle", "") is None


def test_attribute_phrases_are_each_label_word_in_the_caption_frame():
    assert attribute_phrases("a large teal triangle", "teal triangle") == ["a large teal", "a large triangle"]
    assert attribute_phrases("a photo of a seven", "seven") == []  # one word: nothing to compose
    assert attribute_phrases("a large teal triangle", "red square") == []  # label not in the caption


def test_attribute_targets_positives_and_negatives():
    phrases, positives = attribute_targets(CAPTIONS, LABELS)
    assert len(phrases) == len(set(phrases)) == 10  # {large, small} x {red, blue, green, circle, square}
    assert positives.shape == (8, 10)
    for i, (c, lbl) in enumerate(zip(CAPTIONS, LABELS)):
        mine = {phrases[j] for j in range(len(phrases)) if positives[i, j]}
        assert mine == set(attribute_phrases(c, lbl))  # its own phrases are its positives
        negatives = set(phrases) - mine
        assert not negatives & mine  # never a negative equal to a positive
    assert bool(positives.any(dim=0).all())  # every phrase is some image's positive: no negative-only text
    assert "a small green" not in phrases or positives[:, phrases.index("a small green")].any()
    # "a large green" describes image 6, a negative of image 0 ("a large red circle"), a positive of image 6
    j = phrases.index("a large green")
    assert not positives[0, j] and positives[6, j]


def test_attribute_targets_leave_out_captions_without_their_label():
    phrases, positives = attribute_targets(["a red circle", "a blue thing"], ["red circle", "blue square"])
    assert phrases == ["a circle", "a red"] and positives[1].sum() == 0


def test_recombined_captions_include_unseen_pairs_built_from_their_phrases():
    out = dict(recombined_captions(["a large red circle", "a small blue square"], ["red circle", "blue square"]))
    # 2 frames x {red, blue} x {circle, square}: the pairs no caption has (red square, blue circle) included
    assert len(out) == 8
    assert out["a large red square"] == ["a large red", "a large square"]
    assert out["a small blue circle"] == ["a small blue", "a small circle"]
    assert "a red red" not in out


def test_recombined_captions_are_capped_by_an_even_selection():
    """Labels with many words per slot multiply: the cap keeps an evenly spaced selection, every one of them a real
    recombination with its phrases, and the same one on every call (every rank builds the same list)."""
    colours, shapes = [f"c{i}" for i in range(40)], [f"s{j}" for j in range(30)]
    captions = [f"a big {c} {s}" for c in colours for s in shapes]
    labels = [f"{c} {s}" for c in colours for s in shapes]
    assert len(recombined_captions(captions, labels)) == 1200
    capped = recombined_captions(captions, labels, max_captions=100)
    assert len(capped) == 100 and capped == recombined_captions(captions, labels, max_captions=100)
    assert len({c.split()[2] for c, _ in capped}) >= 30  # spread over the first slot, not its first words only
    for caption, parts in capped:
        _, _, colour, shape = caption.split()
        assert parts == [f"a big {colour}", f"a big {shape}"]


def test_templates_are_derived_from_the_caption_frames():
    captions = ["a large teal triangle"] * 6 + ["a small red square"] * 4 + ["one odd red circle"]
    labels = ["teal triangle"] * 6 + ["red square"] * 4 + ["red circle"]
    assert derive_templates(captions, labels) == ["a large {}", "a small {}", "one odd {}"]
    assert derive_templates(captions, labels, min_share=0.2) == ["a large {}", "a small {}"]  # the odd one dropped
    assert derive_templates(captions, labels, max_templates=1) == ["a large {}"]
    assert derive_templates(["a photo"], ["dog"]) == ["a {}"]  # no caption holds its label


def test_auto_templates_come_from_the_training_data_and_reach_the_checkpoint_settings():
    class Data:  # the attributes the task reads from ImageTextDataModule and its in-memory data sets
        train_dataset = type("D", (), {"captions": CAPTIONS, "labels": LABELS})()
        val_dataset = None

    task = build_trainable(tiny_clip_config(templates="auto"))
    assert task.inference_settings()["templates"] == ["a {}"]  # never set up: no frames known
    task._trainer = type("T", (), {"datamodule": Data(), "ckpt_path": None})()
    task.setup("fit")
    task._trainer = None
    assert task.templates == ["a large {}", "a small {}"]
    assert task.inference_settings()["templates"] == ["a large {}", "a small {}"]
    checkpoint = {"hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["templates"] == ["a large {}", "a small {}"]  # a checkpoint that loads


def test_rotation_keeps_colours_and_fills_corners_with_the_image():
    from vlm.data.transforms import train_geometry

    flat = torch.empty(3, 32, 32, dtype=torch.uint8)
    flat[:] = torch.tensor([200, 40, 90], dtype=torch.uint8)[:, None, None]
    torch.manual_seed(0)
    out = train_geometry(32, augment=True, rotation=30)(flat)
    assert (out.int() - flat.int()).abs().max() <= 1  # no black wedges, no colour change
    bar = torch.zeros(3, 32, 32, dtype=torch.uint8)
    bar[:, 14:18, :] = 255  # a horizontal bar: any turn moves pixels off its rows
    turned = [train_geometry(32, augment=True, scale=(1.0, 1.0), rotation=30)(bar) for _ in range(4)]
    assert any(not torch.equal(t, bar) for t in turned)
    assert torch.equal(train_geometry(32, augment=False, rotation=30)(bar), bar)  # evaluation path: untouched


def test_rotation_is_chosen_in_the_data_config(tmp_path):
    from PIL import Image

    from vlm.data.datamodules import ImageTextDataModule
    from vlm.data.tokenizer import CLIPTokenizer

    with pytest.raises(ValueError, match="rotation"):
        ImageTextDataModule(train=str(tmp_path), rotation=-5)
    folder = tmp_path / "train"
    folder.mkdir()
    bar = Image.new("RGB", (32, 32))
    bar.paste((255, 255, 255), (0, 14, 32, 18))
    for i in range(4):
        bar.save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png", "caption": "a bar"}}\n'
                                                   for i in range(4)))
    images = {}
    for rotation in (0.0, 40.0):
        dm = ImageTextDataModule(train=str(folder), batch_size=4, image_size=32, augment=True, rotation=rotation,
                                 in_memory=True, tokenizer=CLIPTokenizer(context_length=8))
        dm.setup("fit")
        torch.manual_seed(0)
        images[rotation] = torch.stack([dm.train_dataset[i]["image"] for i in range(4)]).float()
    # a turned bar lights pixels outside its rows in every column band; crops alone keep it horizontal
    rows_off = lambda x: x[..., :10, :].abs().sum().item() + x[..., 22:, :].abs().sum().item()  # noqa: E731
    assert rows_off(images[40.0] - images[40.0].amin()) > rows_off(images[0.0] - images[0.0].amin())


# ------------------------------------------------------------------------------------------------- loss
def _task(k: int = 1, **overrides):
    args = dict(accumulate_micro_batches=k, same_caption_positive=True, attribute_positives=1.0, compose_text=0.5)
    cfg = tiny_clip_config(warmup_steps=0, **{**args, **overrides})
    torch.manual_seed(0)
    return build_task(cfg).train().to(torch.float64)


def _batch(task) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(CAPTIONS), 3, 16, 16, generator=g, dtype=torch.float64)
    return {"image": images, "text": task.tokenizer(CAPTIONS), "caption": list(CAPTIONS), "label": list(LABELS)}


def _grads(task) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in task.named_parameters() if p.grad is not None}


def test_compositional_terms_change_the_loss_and_reach_the_text_tower():
    task = _task()
    batch = _batch(task)
    loss = task.training_step(batch, 0)
    loss.backward()
    plain = _task(attribute_positives=0.0, compose_text=0.0)
    assert loss.item() > plain.training_step(_batch(plain), 0).item()  # the extra terms are there (both >= 0)
    grads = _grads(task)
    assert grads["model.text.token_embedding.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="caption"):
        task.compute_loss(batch["image"], batch["text"])  # the strings are needed


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (1.0, 0.5)])
def test_accumulated_loss_and_gradients_equal_the_whole_batch(weights):
    ref = _task(1, attribute_positives=weights[0], compose_text=weights[1])
    ref_loss = ref.training_step(_batch(ref), 0)
    ref_loss.backward()
    acc = _task(2, attribute_positives=weights[0], compose_text=weights[1])
    acc_loss = acc.training_step(_batch(acc), 0)
    acc_loss.backward()
    torch.testing.assert_close(acc_loss, ref_loss.detach())
    _assert_same_grads(_grads(acc), _grads(ref))


class _Captioned(torch.utils.data.Dataset):
    def __init__(self, task):
        self.batch = _batch(task)

    def __len__(self):
        return len(CAPTIONS)

    def __getitem__(self, i):
        return {key: value[i] for key, value in self.batch.items()}


def _ddp_main(out: str, k: int) -> None:
    task = _task(k)
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, precision="64-true",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SaveGrads(out)])  # fmt: skip
    loader = torch.utils.data.DataLoader(_Captioned(task), batch_size=4)  # a DistributedSampler splits 8 in 4 + 4
    trainer.fit(task, loader)


@pytest.mark.parametrize("k", [1, 2])
def test_ddp_gradients_equal_one_process_on_the_whole_batch(tmp_path, k):
    """Rank r holds images 2i + r (the sampler interleaves): the phrase list and the normaliser must come from the
    global batch, whichever captions each rank holds."""
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(k)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"grads_rank{r}.pt") for r in (0, 1)]
    ref = _task(1)
    batch = _batch(ref)
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # rank 0's samples, then rank 1's: the gathered order
    batch = {key: value[order] if torch.is_tensor(value) else [value[i] for i in order] for key, value in batch.items()}
    ref.training_step(batch, 0).backward()
    for name in ranks[0]:
        torch.testing.assert_close(ranks[0][name], ranks[1][name])  # both ranks apply the same gradient
    _assert_same_grads(ranks[0], _grads(ref), rtol=1e-4)


if __name__ == "__main__":
    _ddp_main(sys.argv[1], int(sys.argv[2]))
