"""fp32 CPU linear layers on the faster of two kernels: PyTorch's BLAS or its bundled oneDNN.

:class:`Linear` is :class:`torch.nn.Linear` (same parameters and state dict) computed by :func:`linear`, which sends
large fp32 CPU products to oneDNN (``torch.ops.mkldnn._linear_pointwise``: forward and both backward GEMMs) when
that backend is selected, and everything else to ``F.linear``. The default (``VLM_CPU_LINEAR=auto``) selects
oneDNN where PyTorch's MKL runs its slower non-Intel path; ``scripts/benchmark.py --suite roofline`` prints both
kernels' GEMM rates.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@functools.cache
def _onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear kernel (probed once: set_cpu_linear asks on every switch)."""
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w))
    except (AttributeError, RuntimeError):
        return False


def _mkl_runs_its_generic_path() -> bool:
    """Whether torch's BLAS is MKL on an x86 CPU that is not Intel's.

    MKL picks its AVX-512 GEMM kernels only on CPUs that report ``GenuineIntel``; on others (AMD EPYC here) it runs an
    AVX2 path at about half the speed, while oneDNN, bundled in the same PyTorch build, dispatches on the instruction
    set alone (measured on an AVX-512 AMD EPYC: 170-190 vs 380-420 GFLOP/s for every ViT GEMM shape, and faster for
    single-row products too; ``scripts/benchmark.py --suite roofline`` prints both).
    """
    if not torch.backends.mkl.is_available() or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            vendors = {line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")}
    except OSError:  # not Linux: keep PyTorch's own choice
        return False
    return bool(vendors) and vendors != {"GenuineIntel"}


def _default_cpu_linear(setting: str | None) -> str:
    """The backend ``VLM_CPU_LINEAR`` asks for: ``blas``, ``onednn``, or ``auto`` (unset): oneDNN where MKL would run
    its generic path, else PyTorch's BLAS. A deterministic rule, not a timing probe, so that runs repeat bit for bit
    on one machine."""
    setting = (setting or "auto").lower()
    if setting not in ("auto", "onednn", "blas"):
        warnings.warn(f"VLM_CPU_LINEAR must be 'auto', 'onednn' or 'blas', got {setting!r}: using 'auto'", stacklevel=2)
        setting = "auto"
    if setting == "auto":
        setting = "onednn" if _mkl_runs_its_generic_path() else "blas"
    return "onednn" if setting == "onednn" and _onednn_linear_available() else "blas"


# How fp32 CPU linear layers multiply (the environment variable ``VLM_CPU_LINEAR``, or ``set_cpu_linear``).
_CPU_LINEAR = _default_cpu_linear(os.environ.get("VLM_CPU_LINEAR"))


def set_cpu_linear(backend: str) -> str:
    """Selects how fp32 CPU :class:`Linear` layers multiply: ``onednn`` or ``blas``; returns the previous one.

    The default (environment variable ``VLM_CPU_LINEAR`` unset or ``auto``) is oneDNN where PyTorch's BLAS is MKL on
    a non-Intel x86 CPU, BLAS elsewhere: see :func:`cpu_linear_backend`."""
    global _CPU_LINEAR
    if backend not in ("onednn", "blas"):
        raise ValueError(f"backend must be 'onednn' or 'blas', got {backend!r}")
    if backend == "onednn" and not _onednn_linear_available():
        raise RuntimeError("this PyTorch build has no oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise)")
    previous, _CPU_LINEAR = _CPU_LINEAR, backend
    return previous


def cpu_linear_backend() -> str:
    """The backend fp32 CPU :class:`Linear` layers use now: ``onednn`` or ``blas``."""
    return _CPU_LINEAR


@contextlib.contextmanager
def cpu_linear(backend: str) -> Iterator[None]:
    """``with cpu_linear("blas"):`` runs the block with that :func:`set_cpu_linear` backend, then restores it."""
    previous = set_cpu_linear(backend)
    try:
        yield
    finally:
        set_cpu_linear(previous)


# oneDNN's call costs ~15 us more than BLAS's (~100 us for forward + backward), which only pays off from about a
# million multiply-adds per product (measured: 34x64 @ 64x192 is 2x faster on BLAS, 128x128 @ 128x384 1.4x faster on
# oneDNN); smaller products stay on BLAS.
_ONEDNN_MIN_MACS = 1 << 20


def _use_onednn(x: Tensor, weight: Tensor) -> bool:
    return (
        _CPU_LINEAR == "onednn"
        and x.numel() // max(x.shape[-1], 1) * weight.numel() >= _ONEDNN_MIN_MACS
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and type(weight) in (Tensor, nn.Parameter)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_mm(x: Tensor, weight: Tensor, bias: Tensor | None, act: str = "none", approx: str = "") -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], approx)


class _OneDNNLinear(torch.autograd.Function):
    """``x @ w.T + b`` for 2-D ``x`` with all three GEMMs (forward, input and weight gradients) on oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = _onednn_mm(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # grad @ w
        grad_w = _onednn_mm(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None  # grad.T @ x
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with the fp32 CPU multiplies on oneDNN (see :func:`set_cpu_linear`); same values to rounding."""
    if x.dim() < 2 or not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        # A 2-D product viewed back: the Function's own output is then no view, so in-place residual adds stay legal.
        return _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return _onednn_mm(x, weight, bias)


class Linear(nn.Linear):
    """:class:`torch.nn.Linear` (same parameters and state dict) computed by :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


__all__ = ["Linear", "cpu_linear", "cpu_linear_backend", "linear", "set_cpu_linear"]
