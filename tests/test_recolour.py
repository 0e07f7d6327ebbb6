"""Colour-free training views (RecolourView) and the language model's recombined captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.data.datamodules import ImageTextDataModule
from vlm.data.text import TextDataModule
from vlm.data.tokenizer import CLIPTokenizer
from vlm.data.transforms import COLOUR_WORDS, RecolourView, strip_words


def test_strip_words_removes_colour_words_and_mends_the_article():
    assert strip_words("a large red triangle", COLOUR_WORDS) == "a large triangle"
    assert strip_words("an orange seven", COLOUR_WORDS) == "a seven"
    assert strip_words("a red apple.", COLOUR_WORDS) == "an apple."
    assert strip_words("A Blue, round thing", COLOUR_WORDS) == "A round thing"
    assert strip_words("a small square left of a large circle", COLOUR_WORDS) == "a small square left of a large circle"


def test_recolour_view_scrambles_colours_and_keeps_the_image_s_form():
    torch.manual_seed(0)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[0, 2:6, 2:6] = 255  # a red square on black
    view = RecolourView(p=1.0, grey=0.0)
    outs = [view.image(image) for _ in range(20)]
    assert all(o.dtype == torch.uint8 and o.shape == image.shape for o in outs)
    # The square stays where it was (the background stays black) and its colour varies between views.
    assert all(o[:, :2].sum() == 0 and o[:, 2:6, 2:6].sum() > 0 for o in outs)
    assert len({tuple(o[:, 3, 3].tolist()) for o in outs}) > 5
    grey = RecolourView(p=1.0, grey=1.0).image(image)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    with pytest.raises(ValueError, match="probabilities"):
        RecolourView(p=1.5)
    assert RecolourView(words=["Crimson"]).caption("a crimson red car") == "a red car"


def _folder(root: Path) -> Path:
    root.mkdir()
    rows = []
    for i, (colour, rgb) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255))] * 4):
        Image.new("RGB", (16, 16), rgb).save(root / f"{i}.png")
        shape = "circle" if i % 4 < 2 else "square"
        rows.append({"file_name": f"{i}.png", "caption": f"a {colour} {shape}", "label": f"{colour} {shape}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_recolour_replaces_a_training_pair_by_its_colour_free_view_with_its_probability(tmp_path, p, in_memory):
    root = _folder(tmp_path / "train")
    tokenizer = CLIPTokenizer(context_length=16)
    dm = ImageTextDataModule(train=str(root), val=str(root), tokenizer=tokenizer, image_size=16, batch_size=4,
                             in_memory=in_memory, recolour=p)
    dm.setup("fit")
    torch.manual_seed(0)
    samples = [dm.train_dataset[i] for i in range(len(dm.train_dataset))]
    captions = [s["caption"] for s in samples]
    if p == 0.0:
        assert captions == [f"a {c}" for c in ("red circle", "blue circle", "red square", "blue square")] * 2
    else:
        assert sorted(set(captions)) == ["a circle", "a square"]
    for s in samples if in_memory else ():  # pre-tokenised: the tokens are those of the caption it carries
        assert torch.equal(s["tokens"]["text"], tokenizer.encode_batch([s["caption"]])["text"][0])
    # validation is never recoloured
    assert [dm.val_dataset[i]["caption"] for i in range(2)] == ["a red circle", "a blue circle"]


def test_recolour_batches_stack_with_a_tokenizer_that_pads_to_the_longest_caption(tmp_path):
    """Flamingo's tokenizer pads each encoding to its longest text: pairs and their shorter colour-free views
    are padded alike, so a batch mixing them stacks (and each row still spells its own caption)."""
    from vlm.data.gpt2_tokenizer import FlamingoTokenizer

    root = _folder(tmp_path / "train")
    tokenizer = FlamingoTokenizer(context_length=24, vocab_offset=50257)
    dm = ImageTextDataModule(train=str(root), val=str(root), tokenizer=tokenizer, image_size=16, batch_size=8,
                             in_memory=True, recolour=0.5)
    dm.setup("fit")
    torch.manual_seed(1)
    batch = next(iter(dm.train_dataloader()))
    assert {"a circle", "a square"} & set(batch["caption"]) and {"a red circle", "a blue square"} & set(
        batch["caption"])  # both kinds in this batch (seeded)
    for ids, mask, caption in zip(batch["input_ids"], batch["attention_mask"], batch["caption"], strict=True):
        assert caption in tokenizer.decode(ids[mask.bool()])


def test_recolour_is_a_probability_and_refuses_question_records(tmp_path):
    with pytest.raises(ValueError, match="probability"):
        ImageTextDataModule(recolour=2.0)
    root = tmp_path / "vqa"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "0.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "question": "what?", "answer": "x"}) + "\n")
    dm = ImageTextDataModule(train=str(root), tokenizer=CLIPTokenizer(context_length=16), image_size=16,
                             batch_size=1, in_memory=True, recolour=0.5)
    with pytest.raises(ValueError, match="question records"):
        dm.setup("fit")


def test_text_recombine_adds_every_pair_in_the_captions_frames_as_many_as_the_captions(tmp_path):
    root = _folder(tmp_path / "train")
    texts = TextDataModule(train=str(root), text_column="caption", recombine=True).texts("train")
    original, added = texts[:8], texts[8:]
    assert len(added) == len(original)
    # red and blue each meet circle and square in the folder; every combination is there, in the frame "a {}"
    assert set(added) == {"a red circle", "a red square", "a blue circle", "a blue square"}
    held_out = _folder(tmp_path / "partial")
    meta = [json.loads(line) for line in (held_out / "metadata.jsonl").read_text().splitlines()]
    keep = [r for r in meta if r["label"] != "blue square"]  # a pair no caption names
    (held_out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    texts = TextDataModule(train=str(held_out), text_column="caption", recombine=True).texts("train")
    assert "a blue square" not in texts[:len(keep)] and "a blue square" in texts[len(keep):]
    assert TextDataModule(train=str(held_out), text_column="caption").texts("train") == texts[:len(keep)]


@pytest.mark.parametrize("row", [{"caption": "hello there", "label": "world"}, {"caption": "hello there"}])
def test_text_recombine_without_labels_in_the_captions_warns_and_trains_on_the_captions(tmp_path, caplog, row):
    root = tmp_path / "t"
    root.mkdir()
    (root / "data.jsonl").write_text(json.dumps(row) + "\n")
    texts = TextDataModule(train=str(root / "data.jsonl"), text_column="caption", recombine=True).texts("train")
    assert texts == ["hello there"]
    assert "recombine found no labels" in caplog.text
