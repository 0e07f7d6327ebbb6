"""Side-by-side benchmarks: our models against timm, open_clip and transformers, in one process.

Usage: ``python scripts/benchmark.py [--suite NAME ...] [--json] [--quick] [--repeats N]
[--device cuda] [--precision bf16-mixed]``

Prints a table (or, with ``--json``, one JSON object per measurement:
``{"suite", "name", "ours", "peer", "unit", "ratio"}``; ``ratio > 1`` means ours is faster or smaller and rows
without a peer carry ``"peer": null``). ``--quick`` runs tiny sizes in seconds, for tests. Exit code 1 if a suite
failed, 2 for a usage error. With ``--device cuda`` and/or ``--precision bf16-mixed`` the suites that support them
(roofline, vit, clip, memory, ddp) run there, ours and the peers alike; by default only those run.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

# The suites live in benchmarks/ at the repository root, outside the installed vlm package: importable from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import DEVICE_SUITES, SUITES, Row, Settings, run_suite  # noqa: E402
from benchmarks.core import PRECISIONS, keep_freed_memory, set_clock  # noqa: E402

COLUMNS = (("suite", 9), ("name", 78), ("ours", 11), ("peer", 11), ("unit", 8), ("ratio", 7))


def _cell(value: object, width: int) -> str:
    text = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.ljust(width) if width >= 20 or not isinstance(value, float) else text.rjust(width)


def format_row(row: Row) -> str:
    return " ".join(_cell(getattr(row, name), width) for name, width in COLUMNS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite", action="append", choices=list(SUITES), metavar="NAME",
        help=f"suite to run (repeatable; default: all). One of: {', '.join(SUITES)}",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object per measurement instead of a table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the suites run")
    parser.add_argument(
        "--repeats", type=int, help="timed repeats per measurement, median reported (default 5; 2 with --quick)"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="time comparisons in wall seconds (default) or in CPU seconds of this process: with --threads 1 the "
        "CPU clock is barely disturbed by other processes on a busy machine",
    )  # fmt: skip
    parser.add_argument(
        "--keep-freed-memory", action="store_true",
        help="let glibc malloc keep freed memory (no page faults on reused activations); applies to ours and peers",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or a CUDA device (cuda, cuda:1) for the suites that support one")
    parser.add_argument("--precision", choices=PRECISIONS, default="32",
                        help="32 (fp32, default) or bf16-mixed (bf16 autocast, fp32 weights), as Lightning names them")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense bf16 peak for model FLOPs utilisation (default: from its name)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available here")
        if (device.index or 0) >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
        if args.clock == "cpu":
            parser.error("--clock cpu measures the host's CPU time, not the GPU's: use the wall clock with --device")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(quick=args.quick, repeats=args.repeats, device=args.device, precision=args.precision,
                        peak_tflops=args.peak_tflops)  # fmt: skip
    default_suites = list(SUITES) if settings.cpu_fp32 else list(DEVICE_SUITES)
    if args.keep_freed_memory and not keep_freed_memory():
        print("warning: --keep-freed-memory needs glibc; running with the default allocator", file=sys.stderr)
    set_clock(args.clock)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.json:
        print(" ".join(name.ljust(width) for name, width in COLUMNS), flush=True)
    failed = False
    try:
        with warnings.catch_warnings():
            # The suites build tasks around module instances (not configs); Lightning warns about it, harmlessly.
            warnings.filterwarnings("ignore", message="Attribute '.*' is an instance of `nn.Module`")
            for suite in args.suite or default_suites:
                for row in run_suite(suite, settings):
                    failed |= row.name.startswith("error:")
                    print(row.to_json() if args.json else format_row(row), flush=True)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)
        set_clock("wall")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
