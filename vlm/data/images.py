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

Memory is bounded per image, from the header, before any pixel is decoded:

- More than :data:`MAX_PIXELS` (16 Mpx, 2**24 pixels) decoded at full size is refused with an
  :class:`ImageLoadError` naming the file and its size, from the header. That admits 4096 x 4096 (the largest input
  a model takes) and every 12-16 Mpx photo, and keeps a full-size decode within 64 MiB (PIL holds RGB at 4 bytes a
  pixel), so reading any accepted image costs less than 100 MiB over a small one. A JPEG is decoded reduced by its
  own decoder (below), so a baseline JPEG photo of up to :data:`MAX_JPEG_PIXELS` (256 Mpx) is accepted when its
  reduced decode is within the budget (a progressive JPEG holds its whole image's coefficients: the plain budget).
  PIL's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is kept too, and enforced strictly: PIL
  itself only warns between 1x and 2x its limit.
- An image whose long side is over :data:`MAX_SIDE` (4096 px, the largest ``image_size`` vlm builds) is reduced by
  the smallest whole factor that brings its long side to 4096 px or less (so more than 2048 px remain, several
  times a usual model input): a JPEG is decoded reduced by its decoder (``Image.draft``, 1/2, 1/4 or 1/8 scale);
  any other image is decoded once at full size, then converted to RGB and reduced a strip of rows at a time
  (``Image.reduce``, a box filter), so the full-size image is held once and its conversions only a strip at a
  time.
- Images over 2 Mpx and every 16/32-bit or float image are converted in strips the same way, so a conversion
  (alpha compositing, rescaling high-bit values through floats) never makes a full-size copy.

The result is an RGB image of at most 4096 x 4096 pixels (64 MiB in PIL, which keeps RGB at 4 bytes a pixel);
callers that batch images cut each to its model input before decoding the next (:func:`vlm.inputs.load_batches`).
Measured on a 16-bit 8000 x 8000 PNG: decoding it whole and converting it through full-size float arrays took 2 GB;
it is now refused from its header, and a 16-bit 4096 x 4096 one (the budget) decodes within about 100 MB.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is not imported here: a loader of image files must not pay for it (workers, scripts)
    from torch import Tensor

_BACKGROUND = (255, 255, 255)  # alpha is composited on white (see the module docstring)

MAX_PIXELS = 1 << 24  # 16,777,216 pixels (16 Mpx) decoded at full size per image (see the module docstring)
MAX_JPEG_PIXELS = 1 << 28  # a JPEG's size in its header: decoded reduced (1/2 to 1/8) to within MAX_PIXELS
MAX_SIDE = 4096  # the long side of a returned image: vlm's largest image_size
_STRIP_PIXELS = 1 << 21  # pixels converted at a time: 2 Mpx is 8 MiB as RGB, 16 MiB as float64 greyscale
# EXIF orientation -> the transpose that displays the image upright (EXIF 2.3, tag 0x0112)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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


def _high_bit_scale(image: Image.Image) -> float:
    """The factor that maps a 16/32-bit integer or float greyscale image's values onto 0..255.

    Float images in [0, 1] are scaled by 255, others kept; 16-bit images (and 32-bit ones holding values above 255)
    are divided by 257 (65535 -> 255). Measured a strip at a time, so no full-size copy is made.
    """
    width, height = image.size
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    if image.mode == "F":
        top = max((np.nanmax(np.asarray(image.crop((0, y, width, min(height, y + rows)))), initial=0.0)
                   for y in range(0, height, rows)), default=0.0)
        return 255.0 if top <= 1.0 else 1.0
    if image.mode.startswith("I;16"):
        return 1 / 257.0
    top = max((np.asarray(image.crop((0, y, width, min(height, y + rows)))).max(initial=0)
               for y in range(0, height, rows)), default=0)
    return 1 / 257.0 if top > 255 else 1.0


def _high_bit_grey_to_rgb(image: Image.Image, scale: float | None = None) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit RGB, rescaled rather than clipped.

    Args:
        image: an ``I``, ``I;16*`` or ``F`` image (or a strip of one).
        scale: the whole image's factor (:func:`_high_bit_scale`), given when ``image`` is a strip of it.
    """
    scale = _high_bit_scale(image) if scale is None else scale
    # float32 for float images and float64 for integer ones, as numpy's own promotion would give
    pixels = np.array(image, dtype=np.float32 if image.mode == "F" else np.float64)
    if scale != 1.0:
        pixels *= scale
    np.rint(pixels, out=pixels)
    np.nan_to_num(pixels, copy=False)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8), mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB (see the module docstring for the rules).

    A large or high-bit image is converted a strip of rows at a time (:func:`_strips_to_rgb`), so the conversion's
    intermediate images (RGBA, floats) are never made at full size.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F" or image.width * image.height > _STRIP_PIXELS:
        return _strips_to_rgb(image, 1)
    return _convert(image)


def _convert(image: Image.Image, scale: float | None = None) -> Image.Image:
    """:func:`to_rgb` on an image held whole (small, or one strip); ``scale`` as for :func:`_high_bit_grey_to_rgb`."""
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
        return _high_bit_grey_to_rgb(image, scale)
    if mode == "L" and "transparency" in image.info:  # greyscale PNG with a transparent grey level
        return _convert(image.convert("LA"))
    if mode == "RGB" and "transparency" in image.info:
        return _convert(image.convert("RGBA"))
    return image.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def _strips_to_rgb(image: Image.Image, factor: int) -> Image.Image:
    """``image`` converted to RGB and reduced by the whole ``factor`` (a box filter), a strip of rows at a time.

    Each strip is a whole number of ``factor`` rows, so the result is the same as converting the whole image and
    then calling ``Image.reduce(factor)`` on it; only the output and one strip's conversions are held beside
    ``image``. Per-pixel conversions need nothing from the other strips; high-bit images get their whole-image
    scale first (:func:`_high_bit_scale`).
    """
    width, height = image.size
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    rows = max(factor, _STRIP_PIXELS // max(width, 1) // factor * factor)
    scale = _high_bit_scale(image) if image.mode.startswith("I") or image.mode == "F" else None
    for top in range(0, height, rows):
        strip = _convert(image.crop((0, top, width, min(height, top + rows))), scale)
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return out


def _reduction(size: tuple[int, int]) -> int:
    """The smallest whole factor that brings the long side of ``size`` to :data:`MAX_SIDE` or less."""
    return max(1, -(-max(size) // MAX_SIDE))


def _check_budget(name: object, image: Image.Image, limit: int = MAX_PIXELS) -> None:
    """Refuses an image of more than ``limit`` pixels, from its header (nothing is decoded yet)."""
    width, height = image.size
    if width * height > limit:
        raise ImageLoadError(name, f"image too large: {width:,} x {height:,} pixels ({width * height / 1e6:.1f} "
                                   f"Mpx); vlm decodes at most {limit:,} pixels ({limit >> 20} Mpx)"
                                   f"{' from a JPEG' if limit == MAX_JPEG_PIXELS else ''}")


def _orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1, upright, when there is none or the EXIF block is malformed)."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose an otherwise fine image
        return 1
    return value if value in _ORIENTATION else 1


def _decode(name: object, image: Image.Image) -> Image.Image:
    """An opened image -> RGB within :data:`MAX_SIDE`, EXIF orientation applied (see the module docstring)."""
    image.seek(0)  # animated images: the first frame
    # A baseline JPEG decodes reduced a few rows at a time; a progressive one holds every coefficient of the full
    # image (about 3 bytes a pixel) whatever the scale, so it gets the budget of a full-size decode.
    jpeg = image.format == "JPEG" and not image.info.get("progressive") and not image.info.get("progression")
    _check_budget(name, image, MAX_JPEG_PIXELS if jpeg else MAX_PIXELS)
    if _reduction(image.size) > 1:  # JPEG: decoded at 1/2, 1/4 or 1/8 scale (other formats ignore the request)
        image.draft(None, tuple(-(-side // _reduction(image.size)) for side in image.size))
    if jpeg:
        _check_budget(name, image)  # the size the decoder will produce
    image.load()  # before reading the orientation: a PNG may carry its EXIF block after the pixels
    factor = _reduction(image.size)  # what the JPEG decoder's scale left to do, or all of it for other formats
    if factor == 1 and image.width * image.height <= _STRIP_PIXELS and not image.mode.startswith(("I", "F")):
        try:  # small: converted whole, as PIL's own transpose expects
            image = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose an otherwise fine image
            pass
        return _convert(image).copy()
    orientation, rgb = _orientation(image), _strips_to_rgb(image, factor)
    return rgb.transpose(_ORIENTATION[orientation]) if orientation != 1 else rgb


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview) -> Image.Image:
    """Reads an image file (or its bytes) as an RGB ``PIL.Image`` with EXIF orientation applied.

    The pixel budget is checked from the header before decoding, and a large image is decoded reduced to at most
    :data:`MAX_SIDE` pixels on its long side (see the module docstring).

    Args:
        source: a path, or the encoded bytes of an image.

    Returns:
        A fully decoded RGB image of at most ``MAX_SIDE`` x ``MAX_SIDE`` pixels (the file is closed).

    Raises:
        ImageLoadError: missing file, dangling link, directory, empty file, not an image, truncated or corrupt
            data, more than :data:`MAX_PIXELS` pixels, or more than PIL's decompression-bomb limit.
    """
    name, fp = _open_source(source)
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; refuse those images too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                return _decode(name, image)
    except ImageLoadError:
        raise
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




# ------------------------------------------------------------------------- images given in memory or by path
ImageInput = "str | os.PathLike | Image.Image | np.ndarray | Tensor"  # for annotations; vlm.inference has the types
Images = "ImageInput | Sequence[ImageInput]"


def _tensor_types() -> tuple[type[Tensor], ...]:
    """``(torch.Tensor,)`` once torch is imported (a tensor cannot exist before), else ``()``."""
    torch = sys.modules.get("torch")
    return (torch.Tensor,) if torch is not None else ()


def image_items(images: Images) -> list[ImageInput]:
    """One or many images (paths, PIL images, arrays, tensors; a 4-d array or tensor is a batch) as a list of single
    images, none decoded yet.

    Raises:
        ValueError: no images.
    """
    arrays = (np.ndarray, *_tensor_types())
    if isinstance(images, arrays) and images.ndim == 4:
        items: Sequence[Any] = list(images)
    elif isinstance(images, (str, os.PathLike, Image.Image, *arrays)):
        items = [images]
    else:
        items = list(images)
    if not items:
        raise ValueError("no images given")
    return list(items)


def as_pil_list(images: Images) -> list[Image.Image]:
    """One or many images (see :func:`image_items`) as RGB PIL images, all decoded.

    Raises:
        vlm.data.images.ImageLoadError: a path that is not a readable image.
        ValueError: an array or tensor of another shape or dtype.
    """
    return [as_pil(item) for item in image_items(images)]


def as_pil(image: ImageInput) -> Image.Image:
    """One image (a path, PIL image, array (H, W[, C]) or tensor (C, H, W)) as an RGB PIL image, decoded."""
    if isinstance(image, str | os.PathLike):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, _tensor_types()):  # (C, H, W), as torchvision: float in [0, 1] or uint8
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be (C, H, W) with 1, 3 or 4 channels, got {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):  # (H, W) or (H, W, C): uint8, or float in [0, 1]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image array must be (H, W) or (H, W, C) with 1, 3 or 4 channels, got {image.shape}")
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.floating):
                raise ValueError(f"an image array must be uint8 or float in [0, 1], got {image.dtype}")
            image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return to_rgb(Image.fromarray(np.ascontiguousarray(image)))
    raise ValueError(f"not an image: a {type(image).__name__} (give a path, a PIL image, an array or a tensor)")


__all__ = ["MAX_JPEG_PIXELS", "MAX_PIXELS", "MAX_SIDE", "ImageLoadError", "as_pil", "as_pil_list", "display_path",
           "image_items", "load_image", "to_rgb"]
