"""load_image: every image mode becomes correct RGB; every bad input becomes one ImageLoadError line."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.images import ImageLoadError, load_image
from vlm.data.transforms import eval_transform, train_transform


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def _px(image: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def _close(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ conversions
def test_rgb_png_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = load_image(_save(Image.fromarray(arr), tmp_path / "a.png"))
    assert image.size == (7, 5) and np.array_equal(np.asarray(image), arr)


def test_bytes_input(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (1, 2, 3)).save(buf, format="PNG")
    assert _px(load_image(buf.getvalue())) == (1, 2, 3)


@pytest.mark.parametrize("mode,value", [("L", 77), ("1", 1)])
def test_greyscale_and_bilevel(tmp_path, mode, value):
    image = load_image(_save(Image.new(mode, (4, 4), value), tmp_path / "g.png"))
    expected = 255 if mode == "1" else value
    assert _px(image) == (expected,) * 3


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 10, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 10, 128, 255]


def test_float_greyscale(tmp_path):
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    image = load_image(_save(Image.fromarray(arr, mode="F"), tmp_path / "f.tiff"))
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    image = load_image(_save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95))
    r, g, b = _px(image, (8, 8))
    assert r > 230 and g < 30 and b < 30  # pure red


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((1, 0), (255, 0, 0, 0))  # fully transparent
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    image = load_image(_save(rgba, tmp_path / "t.png"))
    assert _px(image, (0, 0)) == (255, 0, 0)
    assert _px(image, (1, 0)) == (255, 255, 255)
    assert _close(_px(image, (2, 0)), (127, 127, 127), tol=2)


def test_la_is_composited_on_white(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 255))
    la.putpixel((1, 0), (0, 0))
    image = load_image(_save(la, tmp_path / "la.png"))
    assert _px(image, (0, 0)) == (0, 0, 0) and _px(image, (1, 0)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    plain = load_image(_save(pal, tmp_path / "p.png"))
    assert _px(plain, (0, 0)) == (0, 0, 255) and _px(plain, (1, 0)) == (0, 255, 0)
    transparent = load_image(_save(pal, tmp_path / "pt.png", transparency=0))
    assert _px(transparent, (0, 0)) == (255, 255, 255) and _px(transparent, (1, 0)) == (0, 255, 0)
    gif = load_image(_save(pal, tmp_path / "pt.gif", transparency=0))
    assert _px(gif, (0, 0)) == (255, 255, 255)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    r, g, b = _px(load_image(path), (4, 4))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40x20: left half red, right half blue, tagged "rotate 90 clockwise to display" (orientation 6).
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_image(_save(image, tmp_path / "rot.jpg", exif=exif, quality=95))
    assert loaded.size == (20, 40)
    assert _close(_px(loaded, (10, 5)), (255, 0, 0), tol=40)  # the stored left half is now on top
    assert _close(_px(loaded, (10, 35)), (0, 0, 255), tol=40)


def test_non_utf8_file_name(tmp_path):
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    Image.new("RGB", (2, 2), (9, 9, 9)).save(name)
    path = os.fsdecode(name)  # a str with a surrogate escape, as os.listdir gives it
    assert _px(load_image(path)) == (9, 9, 9)
    os.truncate(name, 10)
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    str(err.value).encode("utf-8")  # the message is printable


# ------------------------------------------------------------------------------------------ bad inputs
def _png_bytes(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _huge_header_png(width: int, height: int) -> bytes:
    """A tiny file whose PNG header claims width x height pixels."""
    data = bytearray(_png_bytes((2, 2)))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: (p.write_text("hello, not an image"), p)[1], "not an image"),
        (lambda p: (p.write_bytes(_png_bytes()[:300]), p)[1], "truncated"),
        (lambda p: (p.with_suffix(".jpg").write_bytes(_jpeg_bytes()[:600]), p.with_suffix(".jpg"))[1], "truncated"),
        (lambda p: (p.mkdir(), p)[1], "directory"),
        (lambda p: (p.symlink_to(p.parent / "gone.png"), p)[1], "dangling symbolic link"),
        (lambda p: (p.write_bytes(_huge_header_png(30000, 30000)), p)[1], "decompression-bomb limit"),
        (lambda p: (p.write_bytes(_huge_header_png(10000, 10000)), p)[1], "decompression-bomb limit"),
    ],
    ids=["missing", "zero-byte", "text", "truncated-png", "truncated-jpeg", "directory", "dangling-link",
         "bomb-2x", "bomb-1x"],
)
def test_bad_inputs_raise_one_clear_error(tmp_path, make, reason):
    path = make(tmp_path / "bad.png")
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    message = str(err.value)
    assert reason in message and str(path) in message and "\n" not in message
    assert isinstance(err.value, ValueError) and err.value.path == path
    assert Image.MAX_IMAGE_PIXELS is not None  # the limit is never disabled


def test_empty_bytes():
    with pytest.raises(ImageLoadError, match="<bytes>: empty file"):
        load_image(b"")


# ------------------------------------------------------------------------------------------ transforms
def test_train_without_augmentation_is_exactly_eval():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    a = eval_transform(24, mean, std)(image)
    b = train_transform(24, mean, std, augment=False)(image)
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32 and torch.equal(a, b)


def test_eval_resizes_shorter_side_and_centre_crops():
    image = Image.new("RGB", (90, 30), (255, 0, 0))  # red | green | blue thirds
    image.paste((0, 255, 0), (30, 0, 60, 30))
    image.paste((0, 0, 255), (60, 0, 90, 30))
    x = eval_transform(10, (0, 0, 0), (1, 1, 1))(image)
    assert x.shape == (3, 10, 10)
    assert torch.allclose(x[:, 5, 5], torch.tensor([0.0, 1.0, 0.0]), atol=0.02)  # only the centre third is kept
    assert x[1].min() > 0.9


def test_augmentation_never_flips_by_default():
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 32))  # left half red
    transform = train_transform(16, (0, 0, 0), (1, 1, 1), augment=True)
    torch.manual_seed(0)
    outs = [transform(image) for _ in range(20)]
    assert all(out[0, 8, 0] > 0.9 and out[2, 8, -1] > 0.9 for out in outs)  # red stays left
    assert len({tuple(out[0, 8].tolist()) for out in outs}) > 1  # but the crops do vary
