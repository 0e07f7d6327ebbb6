"""Images are decoded within a pixel budget: refused from the header beyond it, decoded reduced below it, converted
a strip at a time, and batched one decoded image at a time (load_image, load_batches, scripts/zero_shot.py).

Memory is measured in a fresh process (``resource.getrusage``), against bounds derived from the image sizes
involved: each bound is below what the code without the feature costs, and above what it costs with it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_checkpoints
from PIL import Image

from vlm.data.images import MAX_PIXELS, MAX_SIDE, ImageLoadError, load_image
from vlm.inputs import load_batches

ROOT = Path(__file__).parent.parent
MIB = 1 << 20
GREY16 = 40000  # a 16-bit grey level: 40000 / 257 -> 156 in 8 bits


def write_constant_png(path: Path, width: int, height: int, bit_depth: int = 16, colour_type: int = 0,
                       pixel: bytes = struct.pack(">H", GREY16)) -> Path:
    """A PNG of one colour, written row by row: a few hundred KB on disk whatever its size (rows compress to
    almost nothing), and never held decoded here."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row, packer = b"\x00" + pixel * width, zlib.compressobj(1)
    data = b"".join([packer.compress(row) for _ in range(height)] + [packer.flush()])
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


# The measured process runs inside a harness process, which reports its child's peak: RUSAGE_CHILDREN of the test
# process itself would also count every earlier subprocess of the session.
_HARNESS = """
import resource, subprocess, sys
done = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
sys.stdout.write(done.stdout)
sys.stderr.write(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)  # Linux reports KiB
sys.exit(done.returncode)
"""


def peak_bytes(code: str) -> tuple[int, str]:
    """Runs ``code`` in a fresh interpreter; returns (its peak resident memory in bytes, its stdout). Anything on
    its stderr that looks like a traceback fails the test."""
    done = subprocess.run([sys.executable, "-c", _HARNESS, code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    *lines, peak = done.stdout.strip().splitlines()
    return int(peak), "\n".join(lines)


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> Path:
    """The issue's file: 9458 x 9458 16-bit grey (89.5 Mpx, under PIL's bomb limit), about 600 KB."""
    return write_constant_png(tmp_path_factory.mktemp("huge") / "huge16.png", 9458, 9458)


def test_an_image_over_the_budget_is_refused_from_its_header_naming_file_and_size(huge):
    assert 9458 * 9458 > MAX_PIXELS and 9458 * 9458 < Image.MAX_IMAGE_PIXELS  # PIL alone would decode it
    with pytest.raises(ImageLoadError) as err:
        load_image(huge)
    message = str(err.value)
    assert str(huge) in message and "9,458 x 9,458" in message and "16 Mpx" in message and "\n" not in message
    # Refused before decoding: its 16-bit pixels alone are 9458^2 x 2 bytes = 171 MiB; the interpreter with numpy
    # and PIL is about 40 MiB. Before the budget this load peaked at 2.85 GB.
    peak, out = peak_bytes(f"""
from vlm.data.images import ImageLoadError, load_image
try:
    load_image({str(huge)!r})
except ImageLoadError as e:
    print("refused")
""")
    assert out == "refused" and peak < 120 * MIB, f"peak {peak / MIB:.0f} MiB"


def test_an_image_at_the_budget_is_decoded_within_its_bound(tmp_path):
    path = write_constant_png(tmp_path / "big16.png", 4096, 4096)  # 16 Mpx: exactly the budget
    # Bound: the full-size 16-bit decode is 32 MiB, the 4096 x 4096 RGB result 64 MiB (PIL keeps 4 bytes a pixel),
    # a strip's conversion about 40 MiB and the interpreter with numpy and PIL about 40 MiB.
    peak, out = peak_bytes(f"""
from vlm.data.images import load_image
image = load_image({str(path)!r})
print(image.mode, image.size, image.getpixel((0, 0)), image.getpixel((4095, 4095)))
""")
    assert out == "RGB (4096, 4096) (156, 156, 156) (156, 156, 156)"
    assert peak < 200 * MIB, f"peak {peak / MIB:.0f} MiB"


def test_a_png_over_the_budget_is_refused_but_a_jpeg_photo_is_decoded_reduced(tmp_path):
    """8192 x 8192 is 64 Mpx: a PNG would be decoded whole (256 MiB as RGB), so it is refused; a JPEG of that size
    is decoded by its own decoder at half scale, within the budget."""
    Image.new("RGB", (8192, 8192), (10, 200, 10)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="8,192 x 8,192 pixels"):
        load_image(tmp_path / "big.png")
    Image.new("RGB", (8192, 8192), (10, 200, 10)).save(tmp_path / "big.jpg", quality=80)
    peak, out = peak_bytes(f"""
from vlm.data.images import load_image
image = load_image({str(tmp_path / "big.jpg")!r})
print(image.size)
""")
    assert out == "(4096, 4096)" and peak < 200 * MIB, f"peak {peak / MIB:.0f} MiB"


@pytest.mark.parametrize("size, factor", [((5000, 300), 2), ((300, 12289), 4), ((8192, 100), 2)])
def test_a_large_image_is_reduced_by_a_whole_factor_to_the_side_bound(tmp_path, size, factor):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "big.png")
    image = load_image(tmp_path / "big.png")
    assert image.mode == "RGB" and max(image.size) <= MAX_SIDE and max(image.size) > MAX_SIDE // 2
    # the same pixels as compositing the whole image on white, then PIL's box reduction
    whole = Image.alpha_composite(Image.new("RGBA", size, (255, 255, 255, 255)), Image.fromarray(pixels, "RGBA"))
    assert np.array_equal(np.asarray(image), np.asarray(whole.convert("RGB").reduce(factor)))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    Image.new("RGB", (9000, 700), (200, 30, 30)).save(tmp_path / "wide.jpg", quality=90)
    image = load_image(tmp_path / "wide.jpg")
    assert max(image.size) <= MAX_SIDE and max(image.size) > MAX_SIDE // 2
    r, g, b = image.getpixel((image.width // 2, image.height // 2))
    assert r > 180 and g < 60 and b < 60


def test_exif_orientation_is_applied_to_a_reduced_image(tmp_path):
    picture = Image.new("RGB", (9000, 600), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 4500, 600))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    picture.save(tmp_path / "rotated.png", exif=exif)
    image = load_image(tmp_path / "rotated.png")
    assert image.size == (200, 3000)  # reduced by 3, then turned upright
    assert image.getpixel((100, 100)) == (255, 0, 0) and image.getpixel((100, 2900)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["F", "I;16", "I"])
def test_high_bit_images_are_rescaled_in_strips_as_whole(tmp_path, mode):
    rng = np.random.default_rng(1)
    if mode == "F":
        pixels = rng.random((1500, 1500), dtype=np.float32)
        pixels[0, 0] = np.nan
        expected = np.clip(np.nan_to_num(np.rint(pixels * np.float32(255.0))), 0, 255)
    else:
        pixels = rng.integers(0, 65536, (1500, 1500)).astype(np.uint16 if mode == "I;16" else np.int32)
        pixels[-1, -1] = 65535  # the largest value is in the last strip: the scale is the whole image's
        expected = np.clip(np.rint(pixels / 257.0), 0, 255)
    path = tmp_path / "deep.tiff"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == mode
    image = np.asarray(load_image(path))
    assert np.array_equal(image[..., 0], expected.astype(np.uint8)) and np.array_equal(image[..., 0], image[..., 2])


# ------------------------------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory, huge) -> dict:
    """A tiny CLIP checkpoint, twelve 4096 x 4096 16-bit images (hard links to one file), a small image and the
    huge one."""
    tmp = tmp_path_factory.mktemp("batch")
    out = write_tiny_checkpoints(tmp)
    first = write_constant_png(tmp / "big00.png", 4096, 4096)
    out["big"] = [first]
    for i in range(1, 12):
        os.link(first, tmp / f"big{i:02d}.png")
        out["big"].append(tmp / f"big{i:02d}.png")
    out["small"] = tmp / "small.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(out["small"])
    out["huge"] = huge
    return out


def test_load_batches_cuts_each_image_to_the_model_input_as_it_is_decoded(batch_inputs):
    paths = [batch_inputs["small"], batch_inputs["huge"], *batch_inputs["big"][:2]]
    (batch,) = load_batches(paths, 8, image_size=32)
    assert batch.paths == paths and list(batch.errors) == [batch_inputs["huge"]]
    assert "9,458 x 9,458" in batch.errors[batch_inputs["huge"]]
    assert [tuple(t.shape) for t in batch.images] == [(3, 32, 32)] * 3 and str(batch.images[0].dtype) == "torch.uint8"


def test_a_batch_ends_early_at_its_pixel_bound(batch_inputs, monkeypatch):
    import vlm.inputs

    monkeypatch.setattr(vlm.inputs, "MAX_BATCH_PIXELS", 2 * 4096 * 4096)
    sizes = [len(b.paths) for b in load_batches(batch_inputs["big"][:5], 64)]
    assert sizes == [2, 2, 1]


def test_zero_shot_script_refuses_the_huge_image_and_holds_one_decoded_image_at_a_time(batch_inputs):
    """One error line for the image over the budget, predictions for the others, exit 1; and the batch of twelve
    4096 x 4096 images never holds them decoded. Each decoded image is 64 MiB (RGB at 4 bytes a pixel in PIL):
    holding the batch's twelve grew the process by about 600 MiB once torch and the model were loaded; decoding
    one at a time and cutting it to the model's input grows it by one decode (the 16-bit file, the RGB image and
    the geometry transform's copies: about 200 MiB). The bound lies between the two."""
    paths = [batch_inputs["small"], batch_inputs["huge"], *batch_inputs["big"]]
    args = ["--checkpoint", str(batch_inputs["clip"]), "--labels", "red,blue", "--json", "--batch-size", "64",
            *map(str, paths)]
    # RUSAGE_SELF is measured in a process forked from the small harness: a process forked from the test process
    # would start from the test process's peak.
    _, out = peak_bytes(f"""
import json, resource, sys
sys.path.insert(0, {str(ROOT / "scripts")!r})
import zero_shot
import vlm
vlm.load({str(batch_inputs["clip"])!r}).classify({str(batch_inputs["small"])!r}, ["red", "blue"])  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
status = zero_shot.main({args!r})
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({{"status": status, "grown": grown}}))
""")
    *lines, summary = out.splitlines()
    result = json.loads(summary)
    records = [json.loads(line) for line in lines]
    assert result["status"] == 1
    assert [r["path"] for r in records] == list(map(str, paths))
    assert "error" in records[1] and "9,458 x 9,458" in records[1]["error"]
    assert all("predictions" in r for i, r in enumerate(records) if i != 1)
    assert result["grown"] < 400 * MIB, f"grew {result['grown'] / MIB:.0f} MiB"


# ------------------------------------------------------------------------------------------------- the page
def test_an_upload_over_the_budget_gets_a_message_in_the_page(huge):
    from vlm.serve import Demo

    shown, probs, caption, heat, status = Demo().analyse(str(huge))
    assert shown is None and probs is None and "Error" in status and "9,458 x 9,458" in status


def test_a_large_upload_is_shown_and_mapped_reduced(batch_inputs, tmp_path):
    import vlm
    from vlm.serve import SHOWN_SIDE, Demo

    Image.new("RGB", (6000, 1000), (250, 20, 20)).save(tmp_path / "wide.png")
    demo = Demo(vlm.load(batch_inputs["clip"]), vlm.load(batch_inputs["flamingo"]), labels=["red", "blue"])
    shown, probs, caption, heat, status = demo.analyse(str(tmp_path / "wide.png"))
    assert status == "Done." and list(probs) and caption
    assert max(shown.size) == SHOWN_SIDE and heat.size == shown.size  # not a 4096 px copy, nor its float maps


def test_vlm_explain_gives_the_huge_image_one_error_line_and_explains_the_others(batch_inputs, tmp_path, capsys):
    from vlm.__main__ import main

    code = main(["explain", "--checkpoint", str(batch_inputs["clip"]), "--labels", "red,blue", "--json", "--out",
                 str(tmp_path / "maps"), str(batch_inputs["huge"]), str(batch_inputs["small"])])
    captured = capsys.readouterr()
    huge, small = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 1 and "9,458 x 9,458" in huge["error"] and Path(small["png"]).exists()
    assert "Traceback" not in captured.err
