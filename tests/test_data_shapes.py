"""The synthetic shapes: determinism, held-out classes, captions that match the pixels, the CLI layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlm.__main__ import main as vlm_main
from vlm.data import shapes as S


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    S.generate_shapes(out, train=240, val=72, seed=3, image_size=48, processes=2)
    return out


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_constants_are_consistent():
    assert len(S.COLOURS) == 6 and len(S.SHAPES) == 6 and len(S.SIZES) == 2
    assert len(S.CLASSNAMES) == 36 == len(set(S.CLASSNAMES))
    # A Latin-square diagonal: every colour and every shape held out exactly once.
    assert sorted(c for c, _ in S.HELD_OUT) == sorted(S.COLOURS)
    assert sorted(s for _, s in S.HELD_OUT) == sorted(S.SHAPES)
    assert len(S.TRAIN_PAIRS) == 30 and not set(S.TRAIN_PAIRS) & set(S.HELD_OUT)


def test_same_seed_same_bytes_other_seed_differs():
    a, row_a = S.make_sample(7, "train", 11, 32)
    b, row_b = S.make_sample(7, "train", 11, 32)
    c, _ = S.make_sample(8, "train", 11, 32)
    assert row_a == row_b and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_generation_is_deterministic_across_runs(tmp_path, shapes_dir):
    # Serial generation must equal the 2-process pool: per-image generators make order irrelevant.
    S.generate_shapes(tmp_path, train=240, val=72, seed=3, image_size=48, processes=1)
    for split in ("train", "validation"):
        assert (tmp_path / split / "metadata.jsonl").read_text() == (shapes_dir / split / "metadata.jsonl").read_text()
        for name in ("00000.png", "00071.png"):
            assert (tmp_path / split / name).read_bytes() == (shapes_dir / split / name).read_bytes()


def test_cli_writes_the_imagefolder_layout(tmp_path, capsys):
    assert vlm_main(["data", "shapes", "--out", str(tmp_path), "--train", "10", "--val", "36", "--seed", "1",
                     "--image-size", "32"]) == 0
    assert "wrote 10 train + 36 validation" in capsys.readouterr().out
    for split, n in (("train", 10), ("validation", 36)):
        rows = _rows(tmp_path / split)
        assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(n)]
        assert all({"file_name", "caption", "label"} <= set(r) for r in rows)
        assert Image.open(tmp_path / split / "00000.png").size == (32, 32)
    assert (tmp_path / "classnames.txt").read_text().splitlines() == list(S.CLASSNAMES)
    assert (tmp_path / "heldout.txt").read_text().splitlines() == list(S.HELD_OUT_CLASSNAMES)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["seed"] == 1 and info["train"] == 10 and info["heldout"] == list(S.HELD_OUT_CLASSNAMES)
    assert S.is_complete(tmp_path)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        vlm_main(["data", "shapes", "--out", "x", "--train", "-1"])
    assert err.value.code == 2 and "--train must be positive" in capsys.readouterr().err
    assert vlm_main(["data", "shapes", "--out", str(tmp_path), "--image-size", "16"]) == 1
    assert "image_size must be at least 32" in capsys.readouterr().err


def test_heldout_never_in_train_and_balanced_in_validation(shapes_dir):
    heldout = set(S.HELD_OUT_CLASSNAMES)
    for row in _rows(shapes_dir / "train"):
        assert not row["heldout"]
        words = row["caption"].split()
        # Every "colour shape" mentioned in the caption (one or two objects) is a training pair.
        for i, word in enumerate(words[:-1]):
            if word in S.COLOURS:
                assert f"{word} {words[i + 1]}" not in heldout, row
    val = _rows(shapes_dir / "validation")
    counts = {name: sum(r["label"] == name for r in val) for name in S.CLASSNAMES}
    assert set(counts.values()) == {2}  # 72 images, every class twice
    assert all(r["caption"] == f"a {r['size']} {r['label']}" for r in val)
    assert sum(r["heldout"] for r in val) == 12


def test_train_mixes_one_and_two_objects_with_relations(shapes_dir):
    rows = _rows(shapes_dir / "train")
    two = [r for r in rows if r["num_objects"] == 2]
    assert 0.1 < len(two) / len(rows) < 0.45  # two_object_prob defaults to 0.25
    assert set(S.RELATIONS) == {rel for r in two for rel in S.RELATIONS if f" {rel} a " in r["full_caption"]}
    for r in rows:
        assert r["full_caption"].startswith(f"a {r['size']} {r['colour']} {r['shape']}")
        assert r["caption"].startswith((f"a {r['size']} {r['colour']} {r['shape']}", f"a {r['colour']} {r['shape']}"))
        assert r["label"] == f"{r['colour']} {r['shape']}"
    with_size = sum(r["caption"].startswith(f"a {r['size']} ") for r in rows) / len(rows)
    assert 0.3 < with_size < 0.7  # size_mention_prob defaults to 0.5


def _object_pixels(scene: S.Scene, image_size: int, which: int) -> np.ndarray:
    """A boolean mask of the pixels covered by one object (rendered alone, no noise)."""
    obj = scene.objects[which]
    single = S.Scene([S.ShapeObject(obj.colour, obj.shape, obj.size, obj.cx, obj.cy, (255, 255, 255))], (0, 0, 0))
    rendered = np.asarray(S.render(single, image_size, np.random.default_rng(0)))
    return rendered.min(axis=2) > 250  # fully covered pixels (noise is only added to the background)


@pytest.mark.parametrize("index", range(12))
def test_caption_matches_rendered_pixels(index):
    size = 64
    rng = S.rng_for(5, "train", index)
    scene = S.sample_train_scene(rng, size)
    image = np.asarray(S.render(scene, size, rng)).astype(int)
    names = np.array(list(S.COLOURS))
    palette = np.array(list(S.COLOURS.values()))
    for k, obj in enumerate(scene.objects):
        mask = _object_pixels(scene, size, k)
        ys, xs = np.nonzero(mask)
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1  # the object's box side in pixels
        assert abs(extent - S.SIZES[obj.size] * size) <= 3, (obj, extent)
        pixels = image[mask]
        nearest = names[np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)]
        values, counts = np.unique(nearest, return_counts=True)
        assert values[counts.argmax()] == obj.colour
    if len(scene.objects) == 2:
        a, b = scene.objects
        dx, dy = a.cx - b.cx, a.cy - b.cy
        expected = {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[scene.relation]
        assert expected and S.caption(scene).split(f" {scene.relation} ")[1].startswith(b.phrase[:2])
        assert not (_object_pixels(scene, size, 0) & _object_pixels(scene, size, 1)).any()


def test_shapes_are_distinguishable_by_their_masks():
    # Same box, different shapes: every pair of shapes differs in a visible number of pixels.
    masks = {}
    for shape in S.SHAPES:
        scene = S.Scene([S.ShapeObject("red", shape, "large", 32, 32, (255, 255, 255))], (0, 0, 0))
        masks[shape] = _object_pixels(scene, 64, 0)
    for a in S.SHAPES:
        for b in S.SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 60, (a, b)


def test_background_is_grey_and_noisy():
    rng = S.rng_for(0, "validation", 0)
    scene = S.sample_val_scene(rng, 0, 64)
    image = np.asarray(S.render(scene, 64, rng)).astype(float)
    background = image[~_object_pixels(scene, 64, 0)]
    assert background.std(axis=0).min() > 5  # gaussian noise
    assert np.abs(background.mean(axis=0) - background.mean()).max() < 10  # grey: channels close


def test_two_object_fraction_is_configurable(tmp_path):
    from vlm.data.shapes import generate_shapes

    out = generate_shapes(tmp_path / "s", train=40, val=36, seed=1, processes=1, two_object_prob=0.0)
    rows = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert all(r["num_objects"] == 1 for r in rows)
    assert json.loads((out / "info.json").read_text())["two_object_prob"] == 0.0
    # The validation split does not depend on it: the one-object CLIP data and the mixed data share it byte for byte.
    mixed = generate_shapes(tmp_path / "m", train=40, val=36, seed=1, processes=1, two_object_prob=0.5)
    for name in ["metadata.jsonl", *(f"{i:05d}.png" for i in range(36))]:
        assert (out / "validation" / name).read_bytes() == (mixed / "validation" / name).read_bytes()
    assert (out / "train" / "metadata.jsonl").read_bytes() != (mixed / "train" / "metadata.jsonl").read_bytes()


def test_size_mention_is_independent_and_full_caption_kept(tmp_path):
    from vlm.data.shapes import SIZES, generate_shapes

    out = generate_shapes(tmp_path / "s", train=60, val=36, seed=2, processes=1, size_mention_prob=0.0)
    train = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    for r in train:
        assert not set(r["caption"].split()) & set(SIZES), r
        assert r["caption"] == r["full_caption"].replace("small ", "").replace("large ", "")
    val = [json.loads(line) for line in (out / "validation" / "metadata.jsonl").read_text().splitlines()]
    assert all(r["caption"] == r["full_caption"] and r["size"] in r["caption"] for r in val)
    # The caption choice has a generator of its own: the images are the same whatever the probability.
    other = generate_shapes(tmp_path / "t", train=60, val=36, seed=2, processes=1, size_mention_prob=1.0)
    assert (out / "train" / "00007.png").read_bytes() == (other / "train" / "00007.png").read_bytes()
