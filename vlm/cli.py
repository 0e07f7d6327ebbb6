"""``vlm export``: the command-line entry point over :mod:`vlm.formats` (LightningCLI runs the other commands)."""

from __future__ import annotations

import argparse
import sys

from vlm.formats.build import CheckpointError
from vlm.formats.export import CONFIG_FILE, WEIGHTS_FILE, export_task
from vlm.formats.load import load_task


def export_main(argv: list[str] | None = None) -> int:
    """``vlm export --checkpoint CKPT --out DIR``; returns the exit code (2 for a refused file or bad usage)."""
    parser = argparse.ArgumentParser(
        prog="vlm export",
        description="Write a task's weights as model.safetensors plus its constructor config (config.json).",
    )
    parser.add_argument("--checkpoint", required=True, help="a Lightning checkpoint (.ckpt) or an export directory")
    parser.add_argument("--out", required=True, help="output directory")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage message
        return int(e.code or 0)
    try:
        task = load_task(args.checkpoint)
        out = export_task(task, args.out)
    except CheckpointError as e:
        print(f"vlm export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"vlm export: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {out / WEIGHTS_FILE} and {out / CONFIG_FILE} ({type(task).__name__})")
    return 0
