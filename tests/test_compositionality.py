"""The compositional test of ``vlm retrieval --compositional`` (:mod:`vlm.compositionality`): which hard negatives
come out of hand-made captions and labels, the scores on embeddings written out by hand, and the command's output on
a tiny folder and checkpoint, checked against the model's own similarities."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_clip_config
from PIL import Image, ImageDraw

from vlm.__main__ import main
from vlm.compositionality import TIE, compositional_scores, hard_negatives, negative_accuracy
from vlm.formats import build_task
from vlm.index import load_clip


# ------------------------------------------------------------------------------------------------ construction
def test_replace_attribute_takes_words_from_the_same_position_only():
    captions = ["a large red circle", "a small blue square", "a photo of a green circle"]
    labels = ["red circle", "blue square", "green circle"]
    out = hard_negatives(captions, labels)
    assert out["replace_attribute"] == [
        ["a large blue circle", "a large green circle", "a large red square"],  # colours at 1, shapes at 2
        ["a small red square", "a small green square", "a small blue circle"],
        ["a photo of a red circle", "a photo of a blue circle", "a photo of a green square"],
    ]
    # one object per caption: the swap is the label's words reversed, in the caption's frame
    assert out["swap_attribute"] == [["a large circle red"], ["a small square blue"], ["a photo of a circle green"]]


def test_labels_of_another_length_are_another_vocabulary():
    captions = ["a large red circle", "a big bright blue square", "a cat"]
    labels = ["red circle", "bright blue square", "cat"]
    out = hard_negatives(captions, labels)
    # the 2-word labels' positions hold only {red} and {circle}: nothing to replace with; a one-word label has no
    # positions at all; the 3-word label is alone too
    assert out["replace_attribute"] == [[], [], []]
    out = hard_negatives(captions + ["a small dark green circle"], labels + ["dark green circle"])
    assert out["replace_attribute"][1] == ["a big dark blue square", "a big bright green square",
                                           "a big bright blue circle"]  # fmt: skip
    assert out["replace_attribute"][0] == []  # "dark", "green" are 3-word positions, never a 2-word label's


def test_no_negative_equals_a_caption_of_the_same_image():
    # image 0 has two captions; replacing "red" by "blue" in the first gives the second: dropped for image 0 only
    captions = ["a red circle", "a blue circle", "a blue circle"]
    labels = ["red circle", "blue circle", "blue circle"]
    out = hard_negatives(captions, labels, owner=[0, 0, 1])
    assert out["replace_attribute"] == [[], [], ["a red circle"]]
    for kind, per_caption in out.items():
        for i, negatives in enumerate(per_caption):
            image = [0, 0, 1][i]
            assert not set(negatives) & {c for c, o in zip(captions, [0, 0, 1]) if o == image}, kind
    # a label whose reversed words read the same gives no swap; no label, or one not in the caption, gives nothing
    assert hard_negatives(["a red red"], ["red red"]) == {"replace_attribute": [[]], "swap_attribute": [[]]}
    out = hard_negatives(["a blue square", "a green circle"], [None, "blue circle"])
    assert out == {"replace_attribute": [[], []], "swap_attribute": [[], []]}
    assert hard_negatives([], []) == {"replace_attribute": [], "swap_attribute": []}
    with pytest.raises(ValueError, match="2 captions, 1 labels"):
        hard_negatives(["a", "b"], ["a"])


def test_swap_attribute_exchanges_attributes_between_two_objects():
    captions = ["a large red circle left of a small blue square", "a green triangle and a green square",
                "a blue square", "a red circle, a blue triangle and a green square"]
    labels = ["red circle", "green triangle", "blue square", "red circle"]
    out = hard_negatives(captions, labels, owner=[0, 1, 2, 3])
    assert out["swap_attribute"] == [
        ["a large blue circle left of a small red square"],
        [],  # the same colour on both: the swap is the caption itself
        [],  # a dataset with two-object captions swaps between objects only; one object gives none
        ["a blue circle, a red triangle and a green square", "a green circle, a blue triangle and a red square",
         "a red circle, a green triangle and a blue square"],  # every two of three objects; punctuation kept
    ]
    # replace works on the label's phrase, wherever it is
    assert "a large red circle left of a small green square" not in out["replace_attribute"][0]
    assert "a large green circle left of a small blue square" in out["replace_attribute"][0]
    # another of the image's captions is never a negative, whatever type made it
    out = hard_negatives(["a red circle and a blue square", "a blue circle and a red square"],
                         ["red circle", "blue square"], owner=[0, 0])
    assert out["swap_attribute"] == [[], []]


# ------------------------------------------------------------------------------------------------ scoring
def test_negative_accuracy_by_hand():
    true = torch.tensor([0.9, 0.5, 0.4])  # captions 0, 1 of image 0; caption 2 of image 1
    owner = torch.tensor([0, 0, 1])
    caption_of = torch.tensor([0, 0, 1, 2, 2])
    negative = torch.tensor([0.1, 0.95, 0.2, 0.4, 0.3])  # won; lost (0.95 > 0.9); won; a tie (lost); won
    out = negative_accuracy(true, negative, caption_of, owner)
    assert out == {"pair_accuracy": pytest.approx(3 / 5), "image_accuracy": 0.0, "pairs": 5, "images": 2}
    negative[1], negative[3] = 0.8, 0.4 - 2 * TIE  # now every pair is won
    assert negative_accuracy(true, negative, caption_of, owner) == {"pair_accuracy": 1.0, "image_accuracy": 1.0,
                                                                    "pairs": 5, "images": 2}  # fmt: skip
    # an image with no pair does not count
    out = negative_accuracy(true, torch.tensor([0.95]), torch.tensor([0]), owner)
    assert out == {"pair_accuracy": 0.0, "image_accuracy": 0.0, "pairs": 1, "images": 1}
    assert negative_accuracy(true, torch.empty(0), torch.empty(0, dtype=torch.long), owner) is None


def unit(degrees):
    rad = torch.deg2rad(torch.tensor(degrees, dtype=torch.float32))
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


def test_compositional_scores_with_embeddings_written_by_hand():
    # 2-d unit vectors at chosen angles: two vectors' similarity is the cosine of the angle between them
    angle = {"a red circle": 0.0, "a blue square": 90.0,  # the true captions
             "a blue circle": 30.0, "a red square": 120.0,  # replace-attribute negatives
             "a circle red": 10.0, "a square blue": 95.0}  # swap-attribute negatives (the labels reversed)
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return unit([angle[t] for t in texts])

    captions, labels = ["a red circle", "a blue square"], ["red circle", "blue square"]
    image = unit([0.0, 110.0])
    text = embed(captions)
    out = compositional_scores(image, text, torch.tensor([0, 1]), captions, labels, embed, chunk=1)
    # image 0 (0 deg): its caption cos 0 beats "a blue circle" (cos 30), "a red square" (cos 120), "a circle red"
    # (cos 10). Image 1 (110 deg): its caption cos 20 loses to "a red square" (cos 10), beats "a blue circle" (cos
    # 80), loses to "a square blue" (cos 15).
    assert out["replace_attribute"] == {"pair_accuracy": 0.75, "image_accuracy": 0.5, "pairs": 4, "images": 2}
    assert out["swap_attribute"] == {"pair_accuracy": 0.5, "image_accuracy": 0.5, "pairs": 2, "images": 2}
    embedded = [t for call in calls[1:] for t in call]  # after the captions: each distinct negative once
    assert sorted(embedded) == sorted(set(angle) - set(captions)) and all(len(c) == 1 for c in calls[1:])
    calls.clear()
    assert compositional_scores(image, text, torch.tensor([0, 1]), captions, labels, embed) == out  # one chunk
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------ the command
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    task = build_task(tiny_clip_config())
    path = tmp_path_factory.mktemp("ckpt") / "clip.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "inference": task.inference_settings()}, path)  # fmt: skip
    return path


def shapes_folder(root, rows):
    """Images (only their being readable matters) and ``rows`` as ``metadata.jsonl``."""
    root.mkdir(parents=True)
    for i, row in enumerate(rows):
        image = Image.new("RGB", (20, 20), (250, 250, 250))
        ImageDraw.Draw(image).ellipse((3, 3, 16, 16), fill=list(COLOURS.values())[i % len(COLOURS)])
        image.save(root / row["file_name"])
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def expected_scores(model, root, rows):
    """Brute force: every (image, caption, negative) similarity from the model, pair by pair."""
    out = {}
    captions, labels = [r["caption"] for r in rows], [r["label"] for r in rows]
    negatives = hard_negatives(captions, labels)
    for kind, per_caption in negatives.items():
        won = []
        for row, caption, negs in zip(rows, captions, per_caption):
            sim = model.similarity(root / row["file_name"], [caption, *negs])[0] if negs else None
            won.append([bool(sim[0] > s + TIE) for s in sim[1:]] if negs else [])
        pairs = [w for ws in won for w in ws]
        out[kind] = {"pair_accuracy": pytest.approx(sum(pairs) / len(pairs), abs=1e-6),
                     "image_accuracy": pytest.approx(sum(all(ws) for ws in won if ws) / sum(1 for ws in won if ws)),
                     "pairs": len(pairs), "images": sum(1 for ws in won if ws)} if pairs else None  # fmt: skip
    return out


def test_retrieval_command_reports_the_compositional_scores(ckpt, tmp_path, capsys):
    rows = [{"file_name": f"{i}.png", "caption": f"a {size} {label}", "label": label}
            for i, (size, label) in enumerate([("large", "red circle"), ("small", "blue square"),
                                               ("large", "green square"), ("small", "blue circle")])]  # fmt: skip
    root = shapes_folder(tmp_path / "val", rows)
    assert main(["retrieval", "--checkpoint", str(ckpt), "--images", str(root), "--json", "--compositional"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert captured.err == ""
    assert set(result) == {"images", "captions", "compositional", *(f"{d}_R@{k}" for d in ("image_to_text",
                           "text_to_image") for k in (1, 5, 10))}  # fmt: skip
    expected = expected_scores(load_clip(ckpt), root, rows)
    assert result["compositional"] == expected
    assert result["compositional"]["replace_attribute"]["pairs"] == 4 * 3  # 2 other colours + 1 other shape each
    assert result["compositional"]["swap_attribute"]["pairs"] == 4  # one reversed label each
    # the text report: the recall lines as before, then one line per type
    assert main(["retrieval", "--checkpoint", str(ckpt), "--images", str(root), "--compositional"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 images, 4 captions" and len(lines) == 5
    r = expected["replace_attribute"]
    assert lines[3] == (f"replace-attribute  accuracy {r['pair_accuracy'].expected:.3f} of 12 pairs  "
                        f"images {r['image_accuracy'].expected:.3f} of 4")
    assert lines[4].startswith("swap-attribute  accuracy ")
    # without the flag the output is the recall alone, as it always was
    assert main(["retrieval", "--checkpoint", str(ckpt), "--images", str(root), "--json"]) == 0
    assert "compositional" not in json.loads(capsys.readouterr().out)


def test_a_type_without_negatives_is_not_applicable(ckpt, tmp_path, capsys):
    # two objects in a caption: swaps go between objects; here they share their colour, so there is none
    rows = [{"file_name": "0.png", "caption": "a red circle and a red square", "label": "red circle"},
            {"file_name": "1.png", "caption": "a red square", "label": "red square"},
            {"file_name": "2.png", "caption": "a blue circle", "label": "blue circle"}]
    root = shapes_folder(tmp_path / "two", rows)
    assert main(["retrieval", "--checkpoint", str(ckpt), "--images", str(root), "--json", "--compositional"]) == 0
    comp = json.loads(capsys.readouterr().out)["compositional"]
    assert comp["swap_attribute"] is None
    assert (comp["replace_attribute"]["pairs"], comp["replace_attribute"]["images"]) == (6, 3)
    assert main(["retrieval", "--checkpoint", str(ckpt), "--images", str(root), "--compositional"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("replace-attribute  accuracy ") and " of 6 pairs  images " in lines[3]
    assert lines[4:] == ["swap-attribute  not applicable (no caption gives such a negative)"]
    # one-word labels have no attribute positions: neither type applies
    rows = [{"file_name": f"{i}.png", "caption": f"a {c} shape", "label": c} for i, c in enumerate(COLOURS)]
    root = shapes_folder(tmp_path / "one", rows)
    assert main(["retrieval", "--checkpoint", str(ckpt), "--images", str(root), "--json", "--compositional"]) == 0
    assert json.loads(capsys.readouterr().out)["compositional"] == {"replace_attribute": None, "swap_attribute": None}


def test_a_folder_without_labels_gets_one_line_and_the_recall(ckpt, tmp_path, capsys):
    rows = [{"file_name": f"{i}.png", "caption": f"a {c} circle"} for i, c in enumerate(COLOURS)]
    root = shapes_folder(tmp_path / "val", rows)
    assert main(["retrieval", "--checkpoint", str(ckpt), "--images", str(root), "--compositional"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "3 images, 3 captions" and lines[1].startswith("image->text  R@1 ") and len(lines) == 4
    assert lines[3] == (f"compositional: not measured, no caption in {root}/metadata.jsonl has a 'label' (a phrase "
                        "found word for word in the caption)")
    assert main(["retrieval", "--checkpoint", str(ckpt), "--images", str(root), "--compositional", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["compositional"] is None and result["images"] == 3
    assert captured.err.strip() == lines[3]
    # bad input is as before: one error line, exit 2
    assert main(["retrieval", "--checkpoint", str(ckpt), "--images", str(tmp_path / "none"), "--compositional"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlm retrieval: error: ")
