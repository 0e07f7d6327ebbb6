"""Hostile inputs to the scripts: a generated corpus of broken, odd and malicious files goes through
``scripts/zero_shot.py`` and ``scripts/caption.py`` as real processes (time-limited, address space limited to
6 GiB). Every input is either processed (odd formats are converted correctly) or gets exactly one error line; no
traceback, no hang; exit codes as DESIGN.md says (0 ok, 1 some input failed, 2 usage). Bad labels and prompts are
usage errors or processed as plain text. Both scripts run on tiny checkpoints trained for 2 steps here."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_clip_config
from PIL import Image, ImageOps
from resume_helpers import ROOT, flamingo_task_config, one_thread, subprocess_env

from vlm.formats import build_task

MEMORY_LIMIT = 6 * 2**30  # torch alone maps ~4 GiB of address space; a decoded bomb would need far more
TIMEOUT = 240


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


# ------------------------------------------------------------------------------------------------ checkpoints
def _train_two_steps(task, batches: list[dict], out: Path) -> Path:
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out.parent)
    trainer.fit(task, torch.utils.data.DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(out)
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile_ckpt")
    with one_thread():
        return _checkpoints(tmp)


def _checkpoints(tmp: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    clip = build_task(tiny_clip_config())
    captions = ["a red circle", "a blue square", "a green star", "a small red cross"]
    clip_batch = {"image": torch.randn(4, 3, 16, 16), **clip.tokenizer.encode_batch(captions)}
    flamingo = build_task(flamingo_task_config())
    flamingo_batch = {"image": torch.randn(4, 3, 16, 16), "caption": captions,
                      **flamingo.tokenizer.encode_batch(captions)}
    return {"clip": _train_two_steps(clip, [clip_batch] * 2, tmp / "clip.ckpt"),
            "flamingo": _train_two_steps(flamingo, [flamingo_batch] * 2, tmp / "flamingo.ckpt")}


# ----------------------------------------------------------------------------------------------------- corpus
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` RGB pixels, followed by a few bytes of (valid) deflate data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def _picture(w: int = 24, h: int = 16, seed: int = 0) -> Image.Image:
    """A non-square, non-symmetric picture: a rotation visibly changes it."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels[:, : w // 3] = (250, 20, 20)
    return Image.fromarray(pixels)


OK = "ok"
EXPECTED = {  # file name -> "ok" or a fragment of its error message
    "animated.gif": OK,
    "bomb.png": "decompression-bomb limit",
    "caf\udce9.png": OK,  # the file name's bytes are not UTF-8 (Latin-1 e-acute)
    "cmyk.jpg": OK,
    "dangling.png": "dangling symbolic link",
    "empty.png": "empty file",
    "exif_rotated.jpg": OK,
    "exif_transposed.png": OK,
    "folder.png": "is a directory",
    "grey16.png": OK,
    "palette_alpha.png": OK,
    "text.png": "not an image",
    "truncated.jpg": "truncated",
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    frames = [_picture(seed=i) for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    _png_header_only(d / "bomb.png", 100_000, 100_000)  # 10^10 pixels: PIL's limit is ~1.8 x 10^8
    _picture(seed=3).save(os.fsencode(d) + b"/caf\xe9.png")
    _picture(seed=4).convert("CMYK").save(d / "cmyk.jpg")
    (d / "dangling.png").symlink_to(d / "does-not-exist.png")
    (d / "empty.png").write_bytes(b"")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate by 90 degrees
    _picture(seed=5).save(d / "exif_rotated.jpg", exif=exif, quality=95)
    with Image.open(d / "exif_rotated.jpg") as im:  # the same decoded pixels, rotated as a viewer shows them
        ImageOps.exif_transpose(im).save(d / "exif_transposed.png")
        im.convert("RGB").save(d.parent / f"{d.name}-exif_ignored.png")  # not rotated (outside the corpus)
    (d / "folder.png").mkdir()
    Image.fromarray(np.arange(24 * 16, dtype=np.uint16).reshape(16, 24) * 170).save(d / "grey16.png")
    palette = Image.new("P", (24, 16), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 12, 16))
    palette.save(d / "palette_alpha.png", transparency=0)
    (d / "text.png").write_text("this is not a PNG\n")
    buf = (d / "exif_rotated.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(buf[: len(buf) // 2])
    assert sorted(p.name for p in d.iterdir()) == sorted(EXPECTED)
    with Image.open(d / "grey16.png") as im:
        assert im.mode.startswith("I")  # really 16-bit
    return d


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _run_script(name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limits)


@pytest.fixture(scope="session")
def corpus_runs(corpus, checkpoints) -> dict[str, tuple[int, list[dict], str]]:
    """Each script once over the corpus folder plus a missing file, side by side; (exit code, JSON lines, stderr)."""
    missing = str(corpus.parent / "missing.png")
    reference = str(corpus.parent / f"{corpus.name}-exif_ignored.png")
    procs = {
        "zero_shot": _run_script("zero_shot", "--checkpoint", str(checkpoints["clip"]), "--labels",
                                 "red circle, blue square ,green star", "--json", "--top-k", "3", str(corpus),
                                 missing, reference),
        "caption": _run_script("caption", "--checkpoint", str(checkpoints["flamingo"]), "--json", str(corpus),
                               missing, reference),
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"{name} hung on the hostile corpus") from None
        results[name] = (proc.returncode, [json.loads(line) for line in out.decode().splitlines()], err.decode())
    return results


@pytest.mark.parametrize("script", ["zero_shot", "caption"])
def test_every_hostile_input_is_processed_or_gets_one_error_line(corpus_runs, corpus, script):
    code, lines, err = corpus_runs[script]
    assert "Traceback" not in err, err
    assert code == 1, err  # some inputs failed, the others were processed
    names = [Path(line["path"]).name for line in lines]
    expected = sorted(EXPECTED) + ["missing.png", f"{corpus.name}-exif_ignored.png"]
    # one line per input, folder entries in sorted order, then the explicit paths; names exact (surrogateescape)
    assert names == expected
    failures = 0
    for name, line in zip(expected, lines):
        want = EXPECTED.get(name, "no such file" if name == "missing.png" else OK)
        if want == OK:
            assert "error" not in line, (name, line)
            assert ("predictions" in line) if script == "zero_shot" else isinstance(line["caption"], str)
        else:
            failures += 1
            assert set(line) == {"path", "error"} and want in line["error"], (name, line)
            assert "\n" not in line["error"]
    assert err.strip().splitlines()[-1] == f"{failures} of {len(expected)} inputs failed"


def test_non_utf8_file_name_round_trips_through_json(corpus_runs):
    """JSON paths are exact: the surrogate-escaped name (written as a \\udcXX escape) gives back the file's bytes."""
    _, lines, _ = corpus_runs["zero_shot"]
    assert any(os.fsencode(line["path"]).endswith(b"/caf\xe9.png") and "predictions" in line for line in lines)


def test_exif_orientation_is_applied_by_the_script(corpus_runs):
    _, lines, _ = corpus_runs["zero_shot"]
    by_name = {Path(line["path"]).name: line for line in lines}
    rotated, transposed = by_name["exif_rotated.jpg"], by_name["exif_transposed.png"]
    ignored = next(line for name, line in by_name.items() if name.endswith("exif_ignored.png"))
    assert rotated["predictions"] == transposed["predictions"]  # the same pixels, turned as the EXIF tag says
    assert rotated["predictions"] != ignored["predictions"]  # (not a test that cannot fail)


def test_odd_modes_are_converted_correctly(corpus):
    """What the scripts were fed: the loader's RGB conversions of the odd formats."""
    from vlm.data.images import load_image

    palette = np.asarray(load_image(corpus / "palette_alpha.png"))
    assert (palette[:, :12] == (0, 0, 255)).all() and (palette[:, 12:] == 255).all()  # transparent -> white
    grey = np.asarray(load_image(corpus / "grey16.png")).astype(int)
    assert grey.shape == (16, 24, 3) and grey.max() > 200 and (grey[..., 0] == grey[..., 2]).all()  # rescaled
    assert np.asarray(load_image(corpus / "cmyk.jpg")).shape == (16, 24, 3)
    gif = load_image(corpus / "animated.gif")
    assert gif.size == (24, 16) and gif.mode == "RGB"


# ------------------------------------------------------------------------------------------- labels, prompts
def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script_under_test", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(module, capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = module.main(list(args))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("labels", [["--labels", " , \t ,"], ["--labels", "   "], ["--labels", "red,,blue"],
                                    ["--labels-file", "WHITESPACE"]])
def test_whitespace_labels_are_a_usage_error(checkpoints, corpus, capsys, tmp_path, labels):
    if labels[1] == "WHITESPACE":
        (tmp_path / "labels.txt").write_text("  \n\t\n \n")
        labels = ["--labels-file", str(tmp_path / "labels.txt")]
    code, out, err = _main(_script("zero_shot"), capsys, "--checkpoint", str(checkpoints["clip"]), *labels,
                           str(corpus / "cmyk.jpg"))
    assert code == 2 and out == ""
    assert len([line for line in err.splitlines() if "error:" in line]) == 1 and "Traceback" not in err


def test_labels_are_stripped_of_surrounding_whitespace(corpus_runs):
    _, lines, _ = corpus_runs["zero_shot"]
    labels = {p["label"] for line in lines if "predictions" in line for p in line["predictions"]}
    assert labels == {"red circle", "blue square", "green star"}


@pytest.mark.parametrize("prompt", ["<|endoftext|>A photo of", "<|endofchunk|> a <pad> photo <|endoftext|>",
                                    "<image> <image> two markers for one image", "<image" * 40])
def test_prompt_with_stray_special_tokens(checkpoints, corpus, capsys, prompt):
    """Special-token text in a prompt is either used as text (a caption comes out) or refused as a usage error
    with one line: never a traceback, never a crash in generation."""
    code, out, err = _main(_script("caption"), capsys, "--checkpoint", str(checkpoints["flamingo"]), "--json",
                           "--prompt", prompt, str(corpus / "cmyk.jpg"), str(corpus / "grey16.png"))
    assert "Traceback" not in err
    if "<image> <image>" in prompt or prompt.startswith("<image<image"):
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    else:
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert len(lines) == 2 and all(isinstance(line["caption"], str) for line in lines)
