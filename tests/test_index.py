"""Image search (``vlm index`` / ``vlm search``) and retrieval recall with several captions per image
(``vlm retrieval``, :func:`vlm.metrics.multi_caption_recall`): rankings equal to the model's own similarities,
incremental updates, the checkpoint tie, bad images and bad index files, the commands' exit codes and JSON."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from conftest import tiny_clip_config
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file

from vlm.__main__ import main
from vlm.formats import build_task
from vlm.index import IndexFileError, build_index, load_clip, load_index, search
from vlm.inference import CLIPPredictor
from vlm.metrics import multi_caption_recall, retrieval_recall

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny CLIP checkpoints with different weights."""
    tmp = tmp_path_factory.mktemp("ckpts")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        task = build_task(tiny_clip_config())
        torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                    "inference": task.inference_settings()}, tmp / f"clip{seed}.ckpt")  # fmt: skip
        out.append(tmp / f"clip{seed}.ckpt")
    return out


def draw(path, colour, shape="circle", size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), (250, 250, 250))
    box = (3, 3, size - 4, size - 4)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=colour)
    image.save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for i, (name, rgb) in enumerate(COLOURS.items()):
        draw(root / ("sub" if i % 2 else "") / f"{name}.png", rgb)
    (root / "notes.txt").write_text("not an image")
    return root


def embeddings_by_path(index):
    return dict(zip(index.paths, index.embeddings))


# ------------------------------------------------------------------------------------------------ index + search
def test_search_ranks_images_as_the_model_scores_them(ckpts, folder, tmp_path):
    report = build_index(ckpts[0], folder, tmp_path / "shapes.index", batch_size=3)
    index = load_index(tmp_path / "shapes.index")
    assert index.files == ["blue.png", "red.png", "sub/green.png", "sub/yellow.png"]  # recursive, sorted, images only
    assert (report.total, report.embedded, report.reused, report.removed, report.failed) == (4, 4, 0, 0, {})
    model = load_clip(ckpts[0])
    torch.testing.assert_close(index.embeddings, model.embed_images(index.paths), atol=1e-5, rtol=0)
    assert index.embeddings.norm(dim=1) == pytest.approx([1.0] * 4, abs=1e-5)
    for query in ("a red circle", "a blue square"):
        expected = model.similarity(index.paths, query)[:, 0]
        order = expected.argsort(descending=True).tolist()
        results = search(index, model, query, top_k=3)
        assert [p for p, _ in results] == [index.paths[i] for i in order[:3]]
        assert [s for _, s in results] == pytest.approx(expected[order[:3]].tolist(), abs=1e-5)
    assert len(search(index, model, "a red circle", top_k=50)) == 4
    with pytest.raises(ValueError, match="empty"):
        search(index, model, "  ", top_k=3)


def test_a_rerun_embeds_only_new_and_changed_images_and_drops_removed_ones(ckpts, folder, tmp_path, monkeypatch):
    out = tmp_path / "shapes.index"
    build_index(ckpts[0], folder, out)
    before = embeddings_by_path(load_index(out))
    seen = []
    real = CLIPPredictor.embed_images
    monkeypatch.setattr(CLIPPredictor, "embed_images", lambda self, images: seen.extend(images) or real(self, images))
    draw(folder / "sub" / "deeper" / "purple.png", (150, 40, 160))  # new
    changed = draw(folder / "red.png", (220, 30, 30), shape="square")  # changed content (and size/mtime)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    (folder / "blue.png").unlink()  # removed
    report = build_index(ckpts[0], folder, out)
    assert (report.total, report.embedded, report.reused, report.removed) == (4, 2, 2, 1)
    assert len(seen) == 2
    index = load_index(out)
    assert index.files == ["red.png", "sub/deeper/purple.png", "sub/green.png", "sub/yellow.png"]
    after = embeddings_by_path(index)
    model = load_clip(ckpts[0])
    torch.testing.assert_close(after[folder / "red.png"], model.embed_images([changed])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(after[folder / "red.png"], before[folder / "red.png"], atol=1e-4)
    for name in ("sub/green.png", "sub/yellow.png"):  # reused rows stay with their own images
        assert torch.equal(after[folder / name], before[folder / name])
    seen.clear()
    again = build_index(ckpts[0], folder, out)  # nothing changed: nothing embedded
    assert (again.embedded, again.reused, again.removed, seen) == (0, 4, 0, [])
    torch.testing.assert_close(load_index(out).embeddings, index.embeddings, atol=0, rtol=0)


def test_an_index_from_another_checkpoint_is_refused_or_rebuilt(ckpts, folder, tmp_path, capsys):
    out = tmp_path / "shapes.index"
    build_index(ckpts[0], folder, out)
    written, first = out.read_bytes(), load_index(out).fingerprint
    with pytest.raises(IndexFileError, match="built with another checkpoint .*clip0.ckpt.*--rebuild"):
        build_index(ckpts[1], folder, out)
    assert out.read_bytes() == written
    code = main(["index", "--checkpoint", str(ckpts[1]), "--images", str(folder), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vlm index: error:") and "--rebuild" in err[0]
    code = main(["search", "--index", str(out), "--checkpoint", str(ckpts[1]), "red"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vlm search: error:") and "another checkpoint" in err[0]
    report = build_index(ckpts[1], folder, out, rebuild=True)
    assert report.embedded == 4
    index = load_index(out)
    assert index.checkpoint == str(ckpts[1]) and index.fingerprint != first
    torch.testing.assert_close(index.embeddings, load_clip(ckpts[1]).embed_images(index.paths), atol=1e-5, rtol=0)


def test_unreadable_images_are_reported_and_the_rest_indexed(ckpts, folder, tmp_path, capsys):
    (folder / "junk.png").write_bytes(b"not a png at all")
    good = (folder / "red.png").read_bytes()
    (folder / "sub" / "cut.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "shapes.index"
    code = main(["index", "--checkpoint", str(ckpts[0]), "--images", str(folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in captured.err
    assert all(line.startswith("vlm index: skipped ") for line in lines)
    assert "junk.png: not an image" in lines[0] and "cut.png: truncated image data" in lines[1]
    assert "4 images (4 embedded, 0 unchanged, 0 removed, 2 skipped)" in captured.out
    assert load_index(out).files == ["blue.png", "red.png", "sub/green.png", "sub/yellow.png"]


def test_the_index_is_a_safetensors_file_with_its_record(ckpts, folder, tmp_path):
    out = tmp_path / "shapes.index"
    build_index(ckpts[0], folder, out)
    assert not out.read_bytes().startswith((b"PK", b"\x80"))  # neither torch.save's zip nor a pickle
    with safe_open(str(out), framework="pt") as f:
        assert list(f.keys()) == ["embeddings"]
        assert f.get_slice("embeddings").get_dtype() == "F32" and f.get_slice("embeddings").get_shape() == [4, 16]
        record = json.loads(f.metadata()["vlm_index"])
    assert record["root"] == str(folder) and record["checkpoint"] == str(ckpts[0]) and record["embed_dim"] == 16
    assert record["fingerprint"].startswith("sha256:") and len(record["fingerprint"]) == 7 + 64
    name, size, mtime = record["files"][1]
    assert (name, size, mtime) == ("red.png", (folder / "red.png").stat().st_size,
                                   (folder / "red.png").stat().st_mtime_ns)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "shapes.index"]  # no temporary file left


def test_files_that_are_not_an_index_are_refused(ckpts, folder, tmp_path):
    bad = tmp_path / "bad.index"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(IndexFileError, match="not a safetensors file"):
        load_index(bad)
    save_file({"embeddings": torch.zeros(2, 4)}, str(bad))
    with pytest.raises(IndexFileError, match="no 'vlm_index' record"):
        load_index(bad)
    out = tmp_path / "shapes.index"
    build_index(ckpts[0], folder, out)
    with safe_open(str(out), framework="pt") as f:
        record = json.loads(f.metadata()["vlm_index"])
    for change, message in ((lambda r: r["files"].pop(), r"is F32 \[4, 16\], expected F32 \[3, 16\]"),
                            (lambda r: r["files"][0].__setitem__(0, "../escape.png"), "'files' must be"),
                            (lambda r: r.update(embed_dim="16"), "'embed_dim' must be")):  # fmt: skip
        broken = json.loads(json.dumps(record))
        change(broken)
        save_file({"embeddings": torch.zeros(4, 16)}, str(bad), metadata={"vlm_index": json.dumps(broken)})
        with pytest.raises(IndexFileError, match=message):
            load_index(bad)
    with pytest.raises(IndexFileError, match="pass --rebuild to replace it"):  # never overwritten unasked
        build_index(ckpts[0], folder, bad)
    with pytest.raises(IndexFileError, match="index not found"):
        load_index(tmp_path / "missing.index")


# ------------------------------------------------------------------------------------------------ commands
def test_search_command_output_and_exit_codes(ckpts, folder, tmp_path, capsys):
    out = tmp_path / "shapes.index"
    assert main(["index", "--checkpoint", str(ckpts[0]), "--images", str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(out), "a", "red", "circle", "--top-k", "3", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # one object per query
    record = json.loads(lines[0])
    assert set(record) == {"query", "results"} and record["query"] == "a red circle"
    records = record["results"]
    assert [set(r) for r in records] == [{"path", "score"}] * 3
    expected = search(load_index(out), load_clip(ckpts[0]), "a red circle", 3)
    assert [(r["path"], r["score"]) for r in records] == [(str(p), pytest.approx(s, abs=1e-6)) for p, s in expected]
    assert main(["search", "--index", str(out), "a red circle", "--top-k", "2"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 2 and text[0].split() == ["1", f"{expected[0][1]:.4f}", str(expected[0][0])]
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"nope")
    for argv, message in ((["--index", str(tmp_path / "missing.index"), "red"], "index not found"),
                          (["--index", str(out), "red", "--top-k", "0"], "--top-k must be between"),
                          (["--index", str(out), "   "], "the query is empty"),
                          (["--index", str(out), "red", "--checkpoint", str(garbage)], "another checkpoint")):
        assert main(["search", *argv]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert captured.out == "" and len(lines) == 1 and lines[0].startswith("vlm search: error:"), captured.err
        assert message in lines[0]
    moved = tmp_path / "moved.ckpt"
    ckpts[0].rename(moved)  # the recorded checkpoint is gone: said so, and how to give one
    try:
        assert main(["search", "--index", str(out), "red"]) == 2
        err = capsys.readouterr().err
        assert "checkpoint not found" in err and "give another with --checkpoint" in err
        assert main(["search", "--index", str(out), "red", "--checkpoint", str(moved), "--json"]) == 0  # same model
        assert len(json.loads(capsys.readouterr().out)["results"]) == 4
    finally:
        moved.rename(ckpts[0])
    assert main(["index", "--checkpoint", str(garbage), "--images", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert main(["index", "--checkpoint", str(ckpts[0]), "--images", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert main(["search", "--index", str(out)]) == 2  # argparse: no query
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ retrieval recall
def test_multi_caption_recall_on_a_hand_computed_case():
    # With image = identity the similarity of image i and caption j is text[j, i]: S is written out directly.
    S = torch.tensor([[0.1, 0.5, 0.9, 0.6, 0.2],  # image 0, captions 0 and 1: best own 0.5, two above -> rank 2
                      [0.8, 0.4, 0.7, 0.6, 0.0],  # image 1, caption 2: 0.7, one above -> rank 1
                      [0.2, 0.3, 0.1, 0.5, 0.4]])  # image 2, captions 3 and 4: best own 0.5, none above -> rank 0
    owner = torch.tensor([0, 0, 1, 2, 2])
    # caption ranks (images above its own): c0 0.1 < 0.8, 0.2 -> 2; c1 -> 0; c2 0.7 < 0.9 -> 1; c3 0.5 < 0.6, 0.6
    # -> 2; c4 -> 0
    out = multi_caption_recall(torch.eye(3), S.T.contiguous(), owner, ks=(1, 2, 3))
    assert out == pytest.approx({"image_to_text_R@1": 1 / 3, "image_to_text_R@2": 2 / 3, "image_to_text_R@3": 1.0,
                                 "text_to_image_R@1": 2 / 5, "text_to_image_R@2": 3 / 5, "text_to_image_R@3": 1.0})
    with pytest.raises(ValueError, match="every image needs at least one caption"):
        multi_caption_recall(torch.eye(3), S.T[:3].contiguous(), owner[:3])
    with pytest.raises(ValueError, match="outside"):
        multi_caption_recall(torch.eye(3), S.T.contiguous(), torch.tensor([0, 0, 1, 2, 3]))


def brute_force(image, text, owner, ks):
    sim = (image @ text.T).tolist()
    n, m = len(sim), len(sim[0])
    out = {}
    for k in ks:
        i2t = [any(owner[j] == i for j in sorted(range(m), key=lambda j: -sim[i][j])[:k]) for i in range(n)]
        t2i = [owner[j] in sorted(range(n), key=lambda i: -sim[i][j])[:k] for j in range(m)]
        out[f"image_to_text_R@{k}"] = sum(i2t) / n
        out[f"text_to_image_R@{k}"] = sum(t2i) / m
    return out


def test_multi_caption_recall_equals_a_brute_force_reference():
    rng = random.Random(0)
    for _ in range(5):
        n = rng.randint(2, 9)
        owner = list(range(n)) + [rng.randrange(n) for _ in range(rng.randint(0, 2 * n))]
        rng.shuffle(owner)
        image, text = torch.randn(n, 6), torch.randn(len(owner), 6)
        ks = (1, 2, 3, 5)
        expected = brute_force(image, text, owner, ks)
        assert multi_caption_recall(image, text, torch.tensor(owner), ks) == pytest.approx(expected)
        assert multi_caption_recall(image, text, torch.tensor(owner), ks, chunk=2) == pytest.approx(expected)


def test_multi_caption_recall_equals_retrieval_recall_with_one_caption_per_image():
    image, text = torch.randn(12, 8), torch.randn(12, 8)
    text[5] = text[3]  # a caption shared by two images (ties count for the true match in both)
    for ks in ((1, 5), (1, 5, 10)):
        ours = multi_caption_recall(image, text, torch.arange(12), ks)
        assert ours == pytest.approx(retrieval_recall(image, text, ks))
        assert 0 < ours["image_to_text_R@1"] < 1  # not a degenerate case


def test_retrieval_command_with_two_captions_per_image(ckpts, tmp_path, capsys):
    root = tmp_path / "captioned"
    for name, rgb in COLOURS.items():
        draw(root / f"{name}.png", rgb)
    (root / "broken.png").write_bytes(b"junk")
    rows = [{"file_name": "red.png", "captions": ["a red circle", "a round red shape"]},
            {"file_name": "green.png", "caption": "a green circle"}, {"file_name": "green.png", "caption": "green"},
            {"file_name": "blue.png", "captions": ["a blue circle", "blue disc"]},
            {"file_name": "yellow.png", "captions": ["a yellow circle", "yellow"]},
            {"file_name": "broken.png", "caption": "unreadable"}, {"file_name": "../red.png", "caption": "outside"}]
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{not json\n")
    assert main(["retrieval", "--checkpoint", str(ckpts[0]), "--images", str(root), "--json"]) == 1  # broken.png
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and "skipped 2 malformed lines (first: line 7: file_name is not a relative path" in err[0]
    assert err[1].startswith("vlm retrieval: skipped") and "broken.png" in err[1]
    model = load_clip(ckpts[0])
    names = ["red", "green", "blue", "yellow"]
    captions = [c for row in rows[:5] for c in row.get("captions", [row.get("caption")])]
    owner = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expected = multi_caption_recall(model.embed_images([root / f"{n}.png" for n in names]),
                                    model.embed_texts(captions), owner)  # fmt: skip
    assert result == {"images": 4, "captions": 8, **{k: pytest.approx(v, abs=1e-6) for k, v in expected.items()}}
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows[:5])) + "\n")  # every image readable
    assert main(["retrieval", "--checkpoint", str(ckpts[0]), "--images", str(root)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "4 images, 8 captions" and text[1].startswith("image->text  R@1 ")
    assert text[2] == "text->image  " + "  ".join(f"R@{k} {expected[f'text_to_image_R@{k}']:.3f}" for k in (1, 5, 10))
    (root / "metadata.jsonl").unlink()
    assert main(["retrieval", "--checkpoint", str(ckpts[0]), "--images", str(root)]) == 2
    assert "vlm retrieval: error: metadata file not found" in capsys.readouterr().err
