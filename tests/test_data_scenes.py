"""vlm data scenes: two-object scenes whose boxes hold their objects, five captions each, deterministic."""

import json

import numpy as np
import pytest

from vlm.__main__ import main
from vlm.data.scenes import two_object_scene
from vlm.data.shapes import COLOURS


def test_each_box_holds_its_object_and_the_captions_name_both():
    for i in range(20):
        image, row = two_object_scene(3, i, 64)
        pixels = np.asarray(image).astype(int)
        labels = [obj["label"] for obj in row["objects"]]
        assert len(set(labels)) == 2 and len(row["captions"]) == 5
        for caption in row["captions"]:
            assert all(label.split(" ")[0] in caption and label.split(" ")[1] in caption for label in labels)
        for obj in row["objects"]:
            colour = np.array(COLOURS[obj["label"].split(" ")[0]])
            near = np.abs(pixels - colour).max(axis=-1) <= 20  # the object's colour, within its jitter
            ys, xs = np.nonzero(near)
            x0, y0, x1, y1 = obj["box"]
            inside = (xs >= x0 - 1) & (xs <= x1 + 1) & (ys >= y0 - 1) & (ys <= y1 + 1)
            assert near.sum() > 20 and inside.mean() > 0.95  # (the other object may share a colour)


def test_command_writes_a_deterministic_imagefolder(tmp_path, capsys):
    assert main(["data", "scenes", "--out", str(tmp_path / "a"), "--count", "4", "--seed", "5"]) == 0
    assert main(["data", "scenes", "--out", str(tmp_path / "b"), "--count", "4", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(4)]
    for i in range(4):
        assert (tmp_path / "a" / f"{i:05d}.png").read_bytes() == (tmp_path / "b" / f"{i:05d}.png").read_bytes()
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, as for the other vlm data commands
        main(["data", "scenes", "--out", str(tmp_path / "c"), "--count", "0"])
    assert exit_info.value.code == 2 and "--count must be positive" in capsys.readouterr().err
