"""Side-by-side benchmarks behind ``scripts/benchmark.py``: ours against timm, open_clip and transformers.

Each suite is a module with ``run(settings) -> Iterator[Row]``; :data:`SUITES` lists them in the order they run.
Suites import their module lazily so that one whose code (or peer library) is missing yields a
"not available yet" row while the others still run.

Method: ours and the peer run in the same process on the same inputs with identical weights (converted with
:mod:`vlm.interop`), after a warm-up, alternately (A B, B A, ...), and the median of the repeats is reported.
On a busy shared machine, ``--threads 1 --clock cpu`` (CPU seconds of one thread) gives far steadier figures
than wall time with two OpenMP threads, which stall whenever another process holds one of the cores.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Iterator

from benchmarks.core import Row, Settings, skip_row

SUITES: dict[str, str] = {
    "roofline": "benchmarks.roofline",
    "vit": "benchmarks.vit",
    "clip": "benchmarks.clip",
    "scaling": "benchmarks.scaling",
    "memory": "benchmarks.memory",
    "generate": "benchmarks.generate",
    "data": "benchmarks.data",
    "scripts": "benchmarks.scripts",
    "serve": "benchmarks.serving",
    "user": "benchmarks.user",
    "compile": "benchmarks.compile",
    "ddp": "benchmarks.ddp",
}


# The suites that run on the settings' device and precision; the others measure the CPU in fp32 only.
DEVICE_SUITES = ("roofline", "vit", "clip", "memory", "ddp")


def run_suite(name: str, settings: Settings) -> Iterator[Row]:
    """Rows of one suite; a missing ``vlm`` or ``benchmarks`` module becomes a skip row, any other failure an
    ``error:`` row."""
    if name not in DEVICE_SUITES and not settings.cpu_fp32:
        yield Row(name, f"skipped: {name} measures the CPU in fp32 only (run it without --device / --precision)",
                  None, None, "", None)  # fmt: skip
        return
    try:
        module = importlib.import_module(SUITES[name])
        yield from module.run(settings)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith(("vlm", "benchmarks")):
            raise
        yield skip_row(name, f"module {e.name} does not exist")
    except Exception as e:  # noqa: BLE001 - one broken suite must not hide the figures of the others
        traceback.print_exc()
        first_line = (str(e).strip().splitlines() or [""])[0]
        yield Row(name, f"error: {type(e).__name__}: {first_line}", None, None, "", None)


__all__ = ["DEVICE_SUITES", "SUITES", "Row", "Settings", "run_suite"]
