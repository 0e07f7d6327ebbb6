"""Decoding a folder in worker processes (``--workers``): the same outputs, bit for bit and in order, as decoding in
process; one error per bad file; a bounded number of images alive whatever the folder's size; nothing heavy imported
by the workers; the scripts' and ``vlm index``'s option."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoints
from PIL import Image

import vlm
import vlm.data.prefetch as prefetch
from vlm.__main__ import main as vlm_main
from vlm.data.prefetch import CHUNK, PREFETCH, default_workers, model_inputs
from vlm.index import embed_files, load_index
from vlm.inputs import load_batches

ROOT = Path(__file__).resolve().parents[1]
BAD = {"03-truncated.png": "truncated image data", "07-text.png": "not an image"}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script_workers", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """20 images of varied sizes and formats (each resized and cropped to the model's input), a truncated PNG and a
    text file named .png among them, in sorted order."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(22):
        name = f"{i:02d}"
        if f"{name}-truncated.png" in BAD:
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "whole.png")
            (root / f"{name}-truncated.png").write_bytes((root / "whole.png").read_bytes()[:300])
            (root / "whole.png").unlink()
        elif f"{name}-text.png" in BAD:
            (root / f"{name}-text.png").write_text("not an image, whatever its name says")
        else:
            h, w = int(rng.integers(9, 90)), int(rng.integers(9, 90))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{name}.{'jpg' if i % 3 == 0 else 'png'}")
    return root


def _paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir())


def test_inputs_are_the_same_bytes_in_the_same_order_with_workers(folder):
    paths = _paths(folder)
    alone, pooled = list(model_inputs(paths, 16, 0)), list(model_inputs(paths, 16, 2))
    assert [p for p, _, _ in alone] == [p for p, _, _ in pooled] == paths
    for (path, a, why_a), (_, b, why_b) in zip(alone, pooled):
        assert why_a == why_b, path
        if path.name in BAD:
            assert a is None and b is None and BAD[path.name] in why_a
        else:
            assert why_a is None and a.dtype == torch.uint8 and a.shape == (3, 16, 16) and torch.equal(a, b), path


def test_classify_and_embed_bit_equal_with_workers(ckpts, folder):
    clip = vlm.load(ckpts["clip"], batch_size=4)
    labels = ["red", "green", "blue"]
    runs = {}
    for workers in (0, 2):
        out = []
        for batch in load_batches(_paths(folder), 5, image_size=clip.image_size, workers=workers):
            preds = clip.classify(batch.images, labels) if batch.images else []
            out.append((batch.paths, batch.ok_paths, batch.errors, preds))
        skipped: list[tuple[str, str]] = []
        names = [p.name for p in _paths(folder)]
        embedded = {}
        for _, part in embed_files(clip, folder, names, lambda n, r, s=skipped: s.append((n, r)), 4, workers):
            embedded.update(part)
        runs[workers] = out, skipped, embedded
    (batches, skipped, embedded), (batches2, skipped2, embedded2) = runs[0], runs[2]
    assert batches == batches2  # the same batches, errors and probabilities (floats compared exactly)
    assert sum(len(e) for _, _, e, _ in batches) == 2
    assert [n for n, _ in skipped] == [n for n, _ in skipped2] == sorted(BAD)
    assert list(embedded) == list(embedded2) and len(embedded) == 20
    assert all(torch.equal(embedded[n], embedded2[n]) for n in embedded)


def test_zero_shot_script_prints_the_same_lines_with_workers(ckpts, folder, capsys):
    script = _script("zero_shot")
    outs = []
    for workers in ("0", "2"):
        code = script.main(["--checkpoint", str(ckpts["clip"]), "--labels", "red,green,blue", "--json",
                            "--batch-size", "3", "--workers", workers, str(folder)])
        out, err = capsys.readouterr()
        assert code == 1 and "2 of 22 inputs failed" in err
        outs.append(out)
    assert outs[0] == outs[1]
    records = [json.loads(line) for line in outs[0].splitlines()]
    assert [Path(r["path"]).name for r in records] == [p.name for p in _paths(folder)]
    assert {Path(r["path"]).name: r["error"] for r in records if "error" in r}.keys() == BAD.keys()


def test_caption_script_prints_the_same_lines_with_workers(ckpts, folder, capsys):
    script = _script("caption")
    outs = []
    for workers in ("0", "2"):
        code = script.main(["--checkpoint", str(ckpts["flamingo"]), "--json", "--batch-size", "4", "--workers",
                            workers, str(folder)])
        out, err = capsys.readouterr()
        assert code == 1 and "2 of 22 inputs failed" in err
        outs.append(out)
    assert outs[0] == outs[1]
    records = [json.loads(line) for line in outs[0].splitlines()]
    assert [Path(r["path"]).name for r in records] == [p.name for p in _paths(folder)]
    assert sum("caption" in r for r in records) == 20 and sum("error" in r for r in records) == 2


def test_vlm_index_with_workers_writes_the_same_index(ckpts, folder, tmp_path, capsys):
    indexes = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.index"
        code = vlm_main(["index", "--checkpoint", str(ckpts["clip"]), "--images", str(folder), "--out", str(out),
                         "--batch-size", "4", "--workers", workers])
        err = capsys.readouterr().err
        assert code == 1 and all(f"skipped {folder / name}" in err for name in BAD)
        indexes.append(load_index(out))
    a, b = indexes
    assert a.files == b.files and len(a.files) == 20 and list(a.stats) == list(b.stats)
    assert torch.equal(a.embeddings, b.embeddings)


@pytest.mark.parametrize("command", [["index", "--images", "."], ["zero_shot", "--labels", "a,b", "x.png"],
                                     ["caption", "x.png"]])
def test_workers_out_of_range_is_a_usage_error(ckpts, command, capsys):
    args = ["--checkpoint", str(ckpts["clip"]), "--workers", "-1", *command[1:]]
    if command[0] == "index":
        code = vlm_main(["index", *args, "--out", "x.index"])
    else:
        with pytest.raises(SystemExit) as e:
            _script(command[0]).main(args)
        code = e.value.code
    assert code == 2 and "--workers must be between 0 and 64" in capsys.readouterr().err


class _Census:
    """Counts, across the worker processes (forked after it is made), the images decoded so far and the decoded
    full-size images alive at once (each tracked until it is garbage), through a wrapped ``load_image``."""

    def __init__(self, monkeypatch) -> None:
        context = multiprocessing.get_context(prefetch.start_method())
        self.decoded, self.alive, self.peak = context.Value("q", 0), context.Value("q", 0), context.Value("q", 0)
        real = prefetch.load_image

        def counted(path):
            image = real(path)
            with self.decoded.get_lock():
                self.decoded.value += 1
                self.alive.value += 1
                self.peak.value = max(self.peak.value, self.alive.value)
            weakref.finalize(image, self._gone)
            return image

        monkeypatch.setattr(prefetch, "load_image", counted)

    def _gone(self) -> None:
        with self.decoded.get_lock():
            self.alive.value -= 1


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("many")
    Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "one.png")
    data = (root / "one.png").read_bytes()
    for i in range(2000):
        (root / f"{i:04d}.png").write_bytes(data)
    return sorted(root.glob("[0-9]*.png"))


@pytest.mark.parametrize("count", [200, 2000])
@pytest.mark.parametrize("workers", [0, 2])
def test_images_alive_at_once_do_not_grow_with_the_folder(many, count, workers, monkeypatch):
    census, batch_size, ahead = _Census(monkeypatch), 8, []
    consumed = 0
    for batch in load_batches(many[:count], batch_size, image_size=8, workers=workers):
        ahead.append(census.decoded.value - consumed)  # decoded, not yet handed over: in flight or in this batch
        consumed += len(batch.paths)
        time.sleep(0.002)  # a model's forward: the workers run ahead as far as they may
    assert consumed == count and census.decoded.value == count
    assert census.alive.value == 0 and census.peak.value <= max(workers, 1)  # full-size images: one per decoder
    # queued chunks, plus the chunk being split into batches, plus the batch: the bound has no term in the count
    bound = batch_size if workers == 0 else workers * PREFETCH * CHUNK + CHUNK + batch_size
    assert max(ahead) <= bound
    if workers:
        assert max(ahead) > batch_size  # the workers did run ahead: the bound is not met by doing nothing


def test_stopping_early_ends_the_workers(many):
    batches = load_batches(many[:400], 8, image_size=8, workers=2)
    next(batches)
    assert multiprocessing.active_children()
    batches.close()
    assert not multiprocessing.active_children()


def test_workers_need_the_models_input_size(many):
    with pytest.raises(ValueError, match="image_size"):
        next(model_inputs(many[:4], None, 2))


def test_default_workers(monkeypatch):
    assert default_workers(5) == 0  # a handful: starting a worker costs more than it saves
    for cpus, expected in ((1, 0), (2, 0), (3, 1), (4, 2), (16, 2)):
        monkeypatch.setattr(prefetch.os, "sched_getaffinity", lambda _, n=cpus: set(range(n)), raising=False)
        assert default_workers(1000) == expected


def test_workers_import_nothing_heavy(ckpts, folder):
    """The workers are forked from a process that loaded a CLIP with vlm.load (neither torchvision, timm, Lightning
    nor torch._dynamo), and decode without importing any of them either."""
    heavy = ("torchvision", "timm", "lightning", "transformers", "torch._dynamo")
    code = f"""
import json, os, pathlib, sys, vlm, vlm.data.prefetch as pf
from vlm.data.images import ImageLoadError
from vlm.inputs import load_batches
real = pf.load_image
def spy(path):  # decodes, then reports the decoding process and what it has imported as the image's error
    real(path)
    raise ImageLoadError(path, json.dumps([os.getpid(), sorted(n for n in {heavy!r} if n in sys.modules)]))
pf.load_image = spy
clip = vlm.load({str(ckpts["clip"])!r})
paths = sorted(p for p in pathlib.Path({str(folder)!r}).iterdir() if p.name not in {sorted(BAD)!r})
seen = [json.loads(r) for b in load_batches(paths, 4, image_size=clip.image_size, workers=2) for r in b.errors.values()]
print(json.dumps({{"pid": os.getpid(), "seen": seen, "heavy": sorted(n for n in {heavy!r} if n in sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [] and len(report["seen"]) == 20
    assert all(heavy == [] for _, heavy in report["seen"])
    assert report["pid"] not in {pid for pid, _ in report["seen"]}  # decoded in the workers
