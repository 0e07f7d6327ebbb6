"""Measurement primitives of ``scripts/benchmark.py``: result rows, interleaved timing, FLOPs, peak memory.

Every comparison is made inside one process, on the same inputs, with ours and the reference library ("peer")
run alternately (ABBA order) after a warm-up, and the median of the repeats reported. The machine is shared and
noisy: interleaving spreads any slow period over both sides so the *ratio* stays meaningful even when the absolute
figures wander. On a GPU every timed call ends with a synchronisation, so the time is that of the kernels, not of
queueing them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from vlm.kernels import onednn_available, resolve_backend, use_cpu_kernels

M = TypeVar("M", bound=nn.Module)

# The clock of every timed comparison: wall time by default. ``process_time`` (CPU seconds of this process, all
# threads) is far less disturbed by other processes on a busy machine: for one thread it is the wall time minus
# the time spent waiting for a core.
_clock: Callable[[], float] = time.perf_counter


def set_clock(name: str) -> None:
    """``wall`` (default) or ``cpu``: the clock :func:`interleaved_medians` times with."""
    global _clock
    _clock = {"wall": time.perf_counter, "cpu": time.process_time}[name]


# Units where a bigger number is better; for every other unit (seconds, bytes...) smaller is better.
HIGHER_IS_BETTER = {"img/s", "texts/s", "tok/s", "GFLOP/s", "TFLOP/s", "%", "steps/s", "x"}


@dataclass(frozen=True)
class Row:
    """One measurement. ``ratio > 1`` means ours is faster (or smaller); ``peer`` is None when there is none."""

    suite: str
    name: str
    ours: float | None
    peer: float | None
    unit: str
    ratio: float | None

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def make_row(suite: str, name: str, ours: float | None, unit: str, peer: float | None = None) -> Row:
    """A row with its ratio oriented so that > 1 favours ours (``ours/peer`` for rates, ``peer/ours`` for costs)."""
    ratio = None
    if ours is not None and peer is not None and ours > 0 and peer > 0:
        ratio = ours / peer if unit in HIGHER_IS_BETTER else peer / ours
    return Row(suite, name, _round(ours), _round(peer), unit, _round(ratio, 3))


def skip_row(suite: str, reason: str) -> Row:
    """The row a suite yields instead of crashing when what it measures does not exist (yet)."""
    return Row(suite, f"not available yet: {reason}", None, None, "", None)


def _round(x: float | None, digits: int = 4) -> float | None:
    if x is None:
        return None
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(digits - 1 - int(math.floor(math.log10(abs(x)))), 0))


def interleaved_medians(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time in seconds of each function, run alternately (A B, B A, A B, ...) after ``warmup`` runs.

    The garbage collector is paused while timing so that a collection triggered by one side is not billed to it.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names if r % 2 == 0 else reversed(names):
                _synchronize()
                start = _clock()
                fns[name]()
                _synchronize()
                times[name].append(_clock() - start)
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def _synchronize() -> None:
    """Waits for queued GPU work, where this process has used CUDA (a no-op otherwise)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn`` alone (for rows with no peer)."""
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls, convolutions, attention; forward and backward).

    PyTorch's counter has formulas for the CUDA attention kernels but none for the CPU one that
    ``scaled_dot_product_attention`` runs here, so it would count that kernel's products (``q @ k.T`` and
    ``p @ v`` per head) as zero. They are counted as model FLOPs: the forward with PyTorch's own attention formula
    (masks and causality do not change it, as on CUDA), the backward as the four products of the gradients, i.e.
    twice the forward, without the kernel's recomputation of the scores.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def forward(q, k, v, *_, out_shape=None, **__) -> int:
        return sdpa_flop_count(q, k, v)

    def backward(grad, q, k, v, *_, out_shape=None, **__) -> int:
        return 2 * sdpa_flop_count(q, k, v)

    # The counter looks an op up by overload to decide whether to decompose it (into the math path's products,
    # which is not what runs), then by packet to count it: both keys are needed.
    cpu_attention = {}
    for packet, formula in (
        (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, forward),
        (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, backward),
    ):
        cpu_attention[packet] = cpu_attention[packet.default] = formula
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        fn()
    return counter.get_total_flops()


def peak_memory_bytes(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes of tensor memory allocated by one call of ``fn`` on ``device`` above what was live before it.

    On CUDA that is the allocator's own peak counter. CPU tensors have no ``max_memory_allocated``; the profiler's
    memory events carry the running total of bytes allocated since profiling began, so its maximum over the call
    is the peak. Weights, optimizer state and gradients that already exist before the call are not counted;
    gradients created by the call are.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences the profiler back end's start/stop lines, which it writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): cost ~ x ** exponent."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves blocks above a (dynamic) threshold with fresh ``mmap`` pages and trims the top of the
    heap on free, so every training step or forward pass faults its activations in again, one 4 KiB page at a
    time (tens of thousands of page faults per ViT forward, measured). Raising both thresholds keeps the pages
    mapped. Process-wide and irreversible, so it is opt-in (``scripts/benchmark.py --keep-freed-memory``); it
    applies to ours and the peers alike. Returns False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; the trim threshold has no such cap.
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def clear_grads(module: nn.Module) -> None:
    """Drops gradients (as ``optimizer.zero_grad()`` does), so each step allocates its own like in training."""
    for p in module.parameters():
        p.grad = None


def default_backend() -> str:
    """The CPU kernels the entry points apply: ``VLM_CPU_LINEAR`` (``auto`` where unset), resolved for this machine
    (``onednn``, ``blas`` or ``off``)."""
    return resolve_backend(os.environ.get("VLM_CPU_LINEAR") or "auto")


def backends(settings: Settings | None = None) -> list[str]:
    """The CPU kernel backends to measure ours on: the default first (what users get), then the other linear backend
    where this build has it; on a GPU only ``off`` (the plain model: the CPU kernels are not applied there)."""
    if settings is not None and settings.on_gpu:
        return ["off"]
    default = default_backend()
    other = "blas" if default == "onednn" else "onednn"
    return [default, other] if other == "blas" or onednn_available() else [default]


def cpu_kernels(model: M, settings: Settings, backend: str | None = None) -> M:
    """``model`` switched to vlm's CPU kernels as the entry points switch it (:func:`vlm.kernels.use_cpu_kernels`):
    ``backend``, or the default; on a GPU the plain model."""
    if settings.on_gpu:
        return use_cpu_kernels(model, "off")
    return use_cpu_kernels(model, backend or default_backend())


PRECISIONS = ("32", "bf16-mixed")


@dataclass
class Settings:
    """Sizes, repeats and placement of a run.

    ``quick`` uses tiny models so the whole suite runs in seconds (tests). ``device`` and ``precision`` (Lightning's
    names: ``32`` or ``bf16-mixed``, i.e. bf16 autocast around fp32 weights) apply to ours and the peer alike; the
    suites that support a GPU (roofline, vit, clip, memory, ddp) read them, the others run on the CPU in fp32.
    ``peak_tflops`` overrides the nominal dense bf16 peak of the GPU that model FLOPs utilisation is measured against.
    """

    quick: bool = False
    repeats: int = 5
    device: str = "cpu"
    precision: str = "32"
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    @property
    def on_gpu(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def cpu_fp32(self) -> bool:
        """The CPU in fp32: where every suite runs and the rows' names carry no placement."""
        return not self.on_gpu and self.precision == "32"

    @property
    def tag(self) -> str:
        """Marks the names of rows measured anywhere but the CPU in fp32 (the rows' names there carry none)."""
        return "" if self.cpu_fp32 else f" [{self.device} {self.precision}]"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context every measured call runs in (ours and the peer's)."""
        if self.precision == "bf16-mixed":
            return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` run under :meth:`autocast`."""

        def run() -> Any:
            with self.autocast():
                return fn()

        return run


# Nominal dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets, by device name.
# Model FLOPs utilisation is measured against these; ``--peak-tflops`` gives the figure for any other device.
NOMINAL_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
)


def nominal_peak_tflops(settings: Settings) -> float | None:
    """The dense bf16 peak of the settings' GPU (``settings.peak_tflops`` first), None where it is not known."""
    if settings.peak_tflops is not None:
        return settings.peak_tflops
    if not settings.on_gpu:
        return None
    name = torch.cuda.get_device_name(torch.device(settings.device))
    return next((tflops for key, tflops in NOMINAL_BF16_TFLOPS if key in name), None)


Suite = Callable[[Settings], Iterator[Row]]
