"""vlm explain: the maps' arithmetic, the Python API on what vlm.load returns, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_checkpoints
from PIL import Image

import vlm
from vlm.__main__ import main
from vlm.data.scenes import two_object_scene
from vlm.explain.localise import chance_in_box, peak_in_box
from vlm.models.layers import record_attention
from vlm.models.vit import VisionTransformer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    out = write_tiny_checkpoints(tmp)
    out["images"] = []
    for i in range(3):
        image, _ = two_object_scene(0, i, 32)
        out["images"].append(tmp / f"scene{i}.png")
        image.save(out["images"][-1])
    return out


def test_rollout_and_class_attention_of_one_block_are_its_normalised_attention(files):
    clip = vlm.load(files["clip"])
    vit = clip.model.vision
    batch = clip.preprocess(Image.open(files["images"][0]))
    with torch.no_grad(), record_attention(vit) as maps:
        vit(batch)
    exp = clip.explain(Image.open(files["images"][0]), ["red circle"])[0]
    attention = [maps[f"blocks.{i}.attn"][0].mean(dim=1)[0] for i in range(len(vit.blocks))]  # (n, n) each
    joint = torch.eye(attention[0].shape[0])
    for a in attention:
        a = a + torch.eye(a.shape[0])
        joint = (a / a.sum(-1, keepdim=True)) @ joint
    grid = exp.grid
    torch.testing.assert_close(exp.maps["rollout"], joint[0, 1:].view(grid))
    torch.testing.assert_close(exp.maps["class_attention"], attention[-1][0, 1:].view(grid))


def test_label_maps_are_what_they_say(files):
    clip = vlm.load(files["clip"])
    image = Image.open(files["images"][1])
    labels = ["red circle", "blue square"]
    text = clip.zero_shot_classifier(labels)
    batch = clip.preprocess(image)
    vit, model = clip.model.vision, clip.model
    # similarity: each patch token through the pooled path's norm and projection, cosine with the label vector
    with torch.no_grad():
        tokens = vit.forward_tokens(batch)[0, 1:]
        cosine = F.normalize(model.vision_proj(vit.fc_norm(tokens)), dim=-1) @ text.T
    sim = clip.explain(image, labels, method="similarity")[0]
    for j, label in enumerate(labels):
        torch.testing.assert_close(sim.labels[label], cosine[:, j].view(sim.grid))
    # relevance: I + sum over blocks of (grad * attention)^+ propagated; the class token's row over patches
    rel = clip.explain(image, labels, method="relevance")[0]
    with record_attention(vit, detach=False) as maps:
        emb = F.normalize(model.vision_proj(vit(batch)), dim=-1)
        score = (emb @ text.T)[0, 1]
        weights = [maps[f"blocks.{i}.attn"][0] for i in range(len(vit.blocks))]
        grads = torch.autograd.grad(score, weights)
    n = weights[0].shape[-1]
    r = torch.eye(n)
    for w, g in zip(weights, grads):
        r = r + (g * w).clamp(min=0).mean(dim=1)[0] @ r
    torch.testing.assert_close(rel.labels["blue square"], r[0, 1:].detach().view(rel.grid))
    assert rel.scores["blue square"] == pytest.approx(float(score.detach()), abs=1e-5)
    assert not torch.equal(rel.labels["red circle"], rel.labels["blue square"])  # a map per label


def test_caption_maps_have_one_map_per_caption_token(files):
    captioner = vlm.load(files["flamingo"])
    images = [Image.open(p) for p in files["images"]]
    explained = captioner.explain(images)
    captions = captioner.caption(images)
    tokenizer = captioner.captioner.tokenizer
    for exp, caption, image in zip(explained, captions, images):
        assert exp.caption == caption
        assert len(exp.words) == len(captioner.captioner.generate_tokens(captioner.preprocess(image))[0])
        assert tokenizer.decode(tokenizer.encode(" ".join(t for t, _ in exp.words))) == caption
        for _, m in exp.words:
            assert m.shape == exp.grid and bool((m >= 0).all()) and float(m.sum()) > 0


def test_a_model_without_maps_says_so(files, tmp_path):
    vit = VisionTransformer(image_size=16, patch_size=8, width=16, depth=1, num_heads=2)
    from vlm.inference import VisionPredictor

    pred = VisionPredictor(vit, "timm:tiny", 16, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(TypeError, match="attention maps need a CLIP or a Flamingo"):
        pred.explain(Image.open(files["images"][0]), ["x"])


def test_pointing_game_arithmetic():
    cell = (8.0, 8.0)
    grid_map = torch.zeros(4, 4)
    grid_map[1, 2] = 1.0  # centre (20, 12)
    assert peak_in_box(grid_map, [16, 8, 24, 16], cell)
    assert not peak_in_box(grid_map, [0, 0, 16, 16], cell)
    assert chance_in_box((4, 4), [0, 0, 16, 16], cell) == 4 / 16  # centres (4, 4), (12, 4), (4, 12), (12, 12)


def test_command_line_writes_overlays_and_raw_maps(files, tmp_path, capsys):
    out = tmp_path / "maps"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    code = main(["explain", "--checkpoint", str(files["clip"]), "--labels", "red circle,blue square", "--json",
                 "--out", str(out), str(files["images"][0]), str(bad), str(files["images"][1])])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # one input failed, the others were explained
    assert [r["path"] for r in records] == [str(files["images"][0]), str(bad), str(files["images"][1])]
    assert "not an image" in records[1]["error"]
    raw = json.loads((out / "scene0.json").read_text())
    assert raw["grid"] == [4, 4] and sorted(x["label"] for x in raw["labels"]) == ["blue square", "red circle"]
    assert np.asarray(raw["maps"]["rollout"]).shape == (4, 4)
    with Image.open(out / "scene0.png") as png:
        assert png.format == "PNG" and png.width > png.height
    code = main(["explain", "--checkpoint", str(files["flamingo"]), "--out", str(out), str(files["images"][2])])
    assert code == 0
    raw = json.loads((out / "scene2.json").read_text())
    assert raw["caption"] == vlm.load(files["flamingo"]).caption(Image.open(files["images"][2]))[0]
    assert len(raw["words"]) >= 1 and np.asarray(raw["words"][0]["map"]).shape == (2, 2)


@pytest.mark.parametrize("args, message", [
    ([], "give --labels or --labels-file"),
    (["--labels", "a,,b"], "label number 2 is blank"),
    (["--labels", "a", "--max-labels", "0"], "--max-labels"),
])
def test_usage_errors_are_one_line_and_exit_2(files, tmp_path, capsys, args, message):
    code = main(["explain", "--checkpoint", str(files["clip"]), "--out", str(tmp_path), *args,
                 str(files["images"][0])])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_missing_checkpoint_is_a_usage_error(tmp_path, capsys):
    code = main(["explain", "--checkpoint", str(tmp_path / "nope.ckpt"), "--labels", "a", str(tmp_path)])
    assert code == 2 and "nope.ckpt" in capsys.readouterr().err
