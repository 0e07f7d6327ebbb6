"""Robust image loading for every user-supplied file.

:func:`load_image` returns an RGB ``PIL.Image`` for anything PIL can decode, and raises :class:`ImageLoadError`
(one human-readable line) for anything it cannot, so scripts can print one error line per bad input and go on.

Conversions to RGB:

- EXIF orientation is applied (phone photos are stored sideways with a rotation tag).
- Transparency (RGBA, LA, PA, palette with a transparent colour) is composited on **white**: transparent icons and
  logos are drawn for white pages, and compositing on black would turn dark artwork into a black square.
- 16-bit and 32-bit integer greyscale are rescaled to 8 bits (PIL's plain ``convert`` would clip them to white);
  float images in [0, 1] are scaled by 255.
- CMYK, YCbCr, LAB, HSV, 1-bit and greyscale go through PIL's converters.
- Animated images (GIF, APNG, WebP): the first frame.

PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is kept, and enforced strictly: images above it
are refused (PIL itself only warns between 1x and 2x the limit), before their pixels are decoded.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_BACKGROUND = (255, 255, 255)  # alpha is composited on white (see the module docstring)


def display_path(path: object) -> str:
    """A printable form of a path, even for file names that are not valid UTF-8."""
    text = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class ImageLoadError(ValueError):
    """An input that is not a decodable image.

    Args:
        path: the file (or ``"<bytes>"``) that failed.
        reason: why, in a few words ("no such file", "empty file (0 bytes)", "truncated image data", ...).
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{display_path(path)}: {reason}")

    def __reduce__(self):  # keeps the two-argument constructor picklable (dataloader workers re-raise it)
        return (type(self), (self.path, self.reason))


# Opened without blocking (a FIFO swapped in after the stat would otherwise block ``open`` forever) and without
# becoming the process's controlling terminal (a tty device swapped in likewise).
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_source(source: str | os.PathLike | bytes | bytearray | memoryview) -> tuple[object, io.IOBase]:
    """Checks the input exists and is a non-empty regular file; returns (name for messages, the open file for PIL).

    The file is checked by path, opened without blocking and checked again on the open descriptor, so a FIFO or
    device (given, found in a folder, or swapped in between the two checks) is refused rather than read.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageLoadError("<bytes>", "empty file (0 bytes)")
        return "<bytes>", io.BytesIO(bytes(source))
    path = os.fspath(source)
    try:
        info = os.stat(path)  # one system call in the common case; the details only when it fails
    except FileNotFoundError:
        reason = "dangling symbolic link" if os.path.islink(path) else "no such file"
        raise ImageLoadError(source, reason) from None
    except (OSError, ValueError) as err:  # ValueError: a NUL in the name
        raise ImageLoadError(source, f"cannot read ({getattr(err, 'strerror', None) or err})") from None
    _check_mode(source, info)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        raise ImageLoadError(source, f"cannot read ({err.strerror or err})") from None
    fp = os.fdopen(fd, "rb")
    try:
        _check_mode(source, os.fstat(fd))
    except BaseException:
        fp.close()
        raise
    return source, fp


def _check_mode(source: object, info: os.stat_result) -> None:
    """Refuses a directory, a FIFO, device or socket, and an empty file."""
    if stat.S_ISDIR(info.st_mode):
        raise ImageLoadError(source, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(source, "not a regular file")
    if info.st_size == 0:
        raise ImageLoadError(source, "empty file (0 bytes)")


def _high_bit_grey_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit RGB, rescaled rather than clipped."""
    pixels = np.asarray(image)
    if image.mode == "F":
        pixels = pixels * 255.0 if np.nanmax(pixels, initial=0.0) <= 1.0 else pixels
    elif image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels / 257.0  # 65535 -> 255
    grey = np.clip(np.nan_to_num(np.rint(pixels)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_bit_grey_to_rgb(image)
    if mode == "L" and "transparency" in image.info:  # greyscale PNG with a transparent grey level
        return to_rgb(image.convert("LA"))
    if mode == "RGB" and "transparency" in image.info:
        return to_rgb(image.convert("RGBA"))
    return image.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview) -> Image.Image:
    """Reads an image file (or its bytes) as an RGB ``PIL.Image`` with EXIF orientation applied.

    Args:
        source: a path, or the encoded bytes of an image.

    Returns:
        A fully decoded RGB image (the file is closed).

    Raises:
        ImageLoadError: missing file, dangling link, directory, empty file, not an image, truncated or corrupt
            data, or more pixels than PIL's decompression-bomb limit.
    """
    name, fp = _open_source(source)
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; refuse those images too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                image.seek(0)  # animated images: the first frame
                image.load()
                try:
                    image = ImageOps.exif_transpose(image)
                except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose an otherwise fine image
                    pass
                return to_rgb(image).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = Image.MAX_IMAGE_PIXELS
        raise ImageLoadError(
            name, f"image too large: more than PIL's decompression-bomb limit of {limit:,} pixels"
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image (unrecognised or unsupported format)") from None
    except MemoryError:
        raise ImageLoadError(name, "image too large to decode in memory") from None
    except OSError as err:
        reason = str(err).lower()
        if "truncated" in reason or "broken data stream" in reason or "unexpected end" in reason:
            raise ImageLoadError(name, "truncated image data") from None
        raise ImageLoadError(name, f"corrupt image data ({err})") from None
    except Exception as err:  # noqa: BLE001 - PIL's plugins raise SyntaxError, struct.error, ValueError, EOFError...
        raise ImageLoadError(name, f"corrupt image data ({type(err).__name__}: {err})") from None
    finally:
        fp.close()  # PIL closes only the files it opened itself


__all__ = ["ImageLoadError", "display_path", "load_image", "to_rgb"]
