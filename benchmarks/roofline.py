"""``roofline``: the fp32 matrix-multiply throughput of this machine, the practical limit the models are held to.

The limit is the best of a few large square GEMMs with a preallocated output (so neither allocation nor page
faults are billed to the multiply), with as many threads as torch uses. Model throughput is reported as a share
of it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from benchmarks.core import Row, Settings, make_row, median_time, nominal_peak_tflops
from vlm.kernels import onednn_available

SUITE = "roofline"


@functools.cache
def gemm_gflops(n: int, m: int, k: int, repeats: int) -> float:
    """Median GFLOP/s of an fp32 (n, k) @ (k, m) product into a preallocated output."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, k, generator=gen), torch.randn(k, m, generator=gen)
    out = torch.empty(n, m)
    seconds = median_time(lambda: torch.mm(a, b, out=out), repeats=repeats, warmup=2)
    return 2 * n * m * k / seconds / 1e9


@functools.cache
def onednn_gemm_gflops(n: int, repeats: int) -> float:
    """Median GFLOP/s of an fp32 n^3 product on oneDNN (the kernel of :mod:`vlm.kernels`' linear layers), 0 if
    absent."""
    if not onednn_available():
        return 0.0
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    return 2 * n**3 / median_time(lambda: onednn_mm(a, b), repeats=repeats, warmup=2) / 1e9


def onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` on oneDNN's linear kernel (what :class:`vlm.kernels.OneDNNLinear` calls)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def compute_dtype(settings: Settings) -> torch.dtype:
    """The dtype the models' matrix products run in under the settings' precision."""
    return torch.bfloat16 if settings.precision == "bf16-mixed" else torch.float32


def device_gemm_tflops(n: int, settings: Settings) -> float:
    """Median TFLOP/s of an n^3 product on the settings' GPU, in its compute dtype, into a preallocated output."""
    gen = torch.Generator(settings.device).manual_seed(0)
    kw = dict(generator=gen, device=settings.device, dtype=compute_dtype(settings))
    a, b, out = torch.randn(n, n, **kw), torch.randn(n, n, **kw), torch.empty(n, n, **kw)
    return 2 * n**3 / median_time(lambda: torch.mm(a, b, out=out), repeats=max(settings.repeats, 5), warmup=3) / 1e12


def gemm_probe(settings: Settings) -> tuple[Callable[[], Tensor], int]:
    """The largest square GEMM of this run and its FLOPs, to time alongside a model: the share of the limit
    is then measured under the same machine conditions as the model itself (other processes, and the sustained
    AVX-512 clock, which is lower than the short bursts of the smaller squares). On the CPU whichever of BLAS (into
    a preallocated output) and oneDNN is faster on this machine is the probe, so the limit is the practical one; on
    a GPU it is a product in the precision's compute dtype."""
    n = max(_square_sizes(settings))
    if settings.on_gpu:
        kw = dict(device=settings.device, dtype=compute_dtype(settings))
        a, b, out = torch.randn(n, n, **kw), torch.randn(n, n, **kw), torch.empty(n, n, **kw)
        return (lambda: torch.mm(a, b, out=out)), 2 * n**3
    gen = torch.Generator().manual_seed(0)
    a, b, out = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen), torch.empty(n, n)
    if onednn_gemm_gflops(n, 3) > gemm_gflops(n, n, n, 3):
        return (lambda: onednn_mm(a, b)), 2 * n**3
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def gemm_limit(settings: Settings) -> float:
    """The machine's GEMM limit in GFLOP/s: the best of the square sizes of this run (on the CPU: fp32, BLAS or
    oneDNN; on a GPU: the precision's compute dtype)."""
    if settings.on_gpu:
        return 1e3 * max(device_gemm_tflops(n, settings) for n in _square_sizes(settings))
    r = max(settings.repeats, 5)
    return max(max(gemm_gflops(n, n, n, r), onednn_gemm_gflops(n, r)) for n in _square_sizes(settings))


def _square_sizes(settings: Settings) -> tuple[int, ...]:
    if settings.on_gpu:
        return settings.pick((4096, 8192), (256,))
    return settings.pick((1024, 2048, 3072), (256,))


def gpu_rows(settings: Settings) -> Iterator[Row]:
    dtype = str(compute_dtype(settings)).removeprefix("torch.")
    tflops = {n: device_gemm_tflops(n, settings) for n in _square_sizes(settings)}
    for n, rate in tflops.items():
        yield make_row(SUITE, f"{dtype} GEMM {n}x{n}x{n} on {settings.device}", rate, "TFLOP/s")
    peak = nominal_peak_tflops(settings)
    if peak is not None and dtype == "bfloat16":  # the limit: the best of the sizes just timed
        yield make_row(SUITE, "bf16 GEMM limit as a share of the nominal dense bf16 peak "
                       f"({peak:g} TFLOP/s)", 100 * max(tflops.values()) / peak, "%")  # fmt: skip


def run(settings: Settings) -> Iterator[Row]:
    if settings.on_gpu:
        yield from gpu_rows(settings)
        return
    repeats = max(settings.repeats, 5)
    for n in _square_sizes(settings):
        yield make_row(SUITE, f"fp32 GEMM {n}x{n}x{n} (BLAS)", gemm_gflops(n, n, n, repeats), "GFLOP/s")
        yield make_row(SUITE, f"fp32 GEMM {n}x{n}x{n} (oneDNN)", onednn_gemm_gflops(n, repeats), "GFLOP/s")
    # The GEMMs a ViT-B/16 forward actually runs (batch 8, 197 tokens): K = 768 and 3072 are smaller than the
    # square sizes, so these show how close to the limit the model's own shapes can get.
    tokens = settings.pick(8 * 197, 64)
    width = settings.pick(768, 64)
    shapes = {"qkv": (3 * width, width), "mlp fc1": (4 * width, width), "mlp fc2": (width, 4 * width)}
    for name, (m, k) in shapes.items():
        gflops = gemm_gflops(tokens, m, k, repeats)
        yield make_row(SUITE, f"fp32 GEMM ViT-B/16 {name} {tokens}x{m}x{k}", gflops, "GFLOP/s")
    yield make_row(SUITE, "fp32 GEMM limit (best square)", gemm_limit(settings), "GFLOP/s")
