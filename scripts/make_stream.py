"""Writes a large synthetic image-caption set directly as webdataset tar shards, for streaming at scale.

Each sample is a small PNG of one coloured square on a grey background and its caption ("a red square", "a small
blue square", ...), stored as ``KEY.png`` + ``KEY.txt`` with ``KEY`` the sample's 8-digit index: the layout
``vlm data shards`` writes and :class:`vlm.data.datamodules.ImageTextDataModule` streams (give it the output
folder as ``train``). Shards are ``shard-NNNNNN.tar`` (written as ``.tar.tmp`` and renamed when complete), with
``shards.json`` listing every shard's sample count, as ``vlm data shards`` does. No imagefolder is written first.

A tar member takes a 512-byte header plus its data rounded up to 512 bytes, so a sample costs 2 KiB on disk
however small its image: a million samples are about 2 GiB.

Usage: ``python scripts/make_stream.py OUT [--num N] [--shard-size S] [--image-size PX] [--seed SEED]``
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import random
import sys
import tarfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "black": (20, 20, 20), "white": (250, 250, 250),
}
SIZES = {"small": 0.3, "": 0.45, "large": 0.65}  # side of the square as a fraction of the image
_BACKGROUND = (128, 128, 128)


@functools.cache
def square_png(colour: str, side: int, x: int, y: int, image_size: int) -> bytes:
    """PNG bytes of one ``colour`` square of ``side`` pixels at ``(x, y)`` (a few thousand distinct images)."""
    image = Image.new("RGB", (image_size, image_size), _BACKGROUND)
    ImageDraw.Draw(image).rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def sample(rng: random.Random, image_size: int) -> tuple[bytes, str]:
    """(PNG bytes, caption) of the next sample drawn from ``rng``."""
    colour = rng.choice(list(COLOURS))
    size = rng.choice(list(SIZES))
    side = max(2, round(SIZES[size] * image_size))
    x, y = rng.randrange(image_size - side + 1), rng.randrange(image_size - side + 1)
    caption = " ".join(w for w in ("a", size, colour, "square") if w)
    return square_png(colour, side, x, y, image_size), caption


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_stream(out: Path, num: int, shard_size: int = 10_000, image_size: int = 32, seed: int = 0,
                 progress_every: int = 100_000) -> dict[str, int | float]:
    """Writes ``num`` samples as shards of ``shard_size`` into ``out``; returns samples, shards, bytes, seconds."""
    if num <= 0 or shard_size <= 0 or image_size < 4:
        raise ValueError("num and shard_size must be positive, image_size at least 4")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    start, written = time.perf_counter(), 0
    index: list[dict[str, int | str]] = []
    for first in range(0, num, shard_size):
        count = min(shard_size, num - first)
        final = out / f"shard-{first // shard_size:06d}.tar"
        tmp = final.with_name(final.name + ".tmp")  # a shard appears complete or not at all
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key in range(first, first + count):
                png, caption = sample(rng, image_size)
                _add(tar, f"{key:08d}.png", png)
                _add(tar, f"{key:08d}.txt", caption.encode("utf-8"))
                if progress_every and (key + 1) % progress_every == 0:
                    print(f"{key + 1} samples, {time.perf_counter() - start:.1f} s", flush=True)
        tmp.replace(final)
        written += final.stat().st_size
        index.append({"file": final.name, "count": count})
    (out / "shards.json").write_text(json.dumps({"total": num, "shards": index}, indent=2) + "\n")
    return {"samples": num, "shards": len(index), "bytes": written, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--num", type=int, default=1_000_000, help="samples to write (default 1,000,000)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default 10,000)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        report = write_stream(args.out, args.num, args.shard_size, args.image_size, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report['samples']} samples in {report['shards']} shards to {args.out}: "
          f"{report['bytes']} bytes ({report['bytes'] / 2**30:.2f} GiB) in {report['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
