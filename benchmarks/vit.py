"""``vit``: our VisionTransformer against timm's, same configuration and identical weights.

For ViT-S/16 and ViT-B/16 at 224 px: images/s, achieved GFLOP/s and share of the machine's fp32 GEMM limit (a
square GEMM timed alongside), for inference (forward under ``no_grad``) and for a forward+backward pass, plus the
largest absolute difference of the two outputs (0 when both compute the same thing). On the CPU ours runs with
:func:`vlm.kernels.use_cpu_kernels` applied, as the entry points apply it: the unmarked rows with the default
backend on this machine, the rows marked ``VLM_CPU_LINEAR=...`` with the other one, so that the gain of the backend
and of the rest of the code path can be told apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.core import (
    Row,
    Settings,
    backends,
    clear_grads,
    count_flops,
    cpu_kernels,
    interleaved_medians,
    make_row,
    nominal_peak_tflops,
)
from benchmarks.roofline import gemm_probe
from vlm.models.vit import VisionTransformer

SUITE = "vit"


@dataclass(frozen=True)
class ViTSize:
    """The constructor arguments shared by our ViT and timm's for one benchmarked model."""

    label: str
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int


FULL_SIZES = (ViTSize("ViT-S/16", 224, 16, 384, 12, 6), ViTSize("ViT-B/16", 224, 16, 768, 12, 12))
QUICK_SIZES = (ViTSize("ViT-tiny/8", 32, 8, 64, 2, 2),)


def vit_pair(size: ViTSize, seed: int = 0) -> tuple[VisionTransformer, nn.Module]:
    """timm's ViT of this configuration and ours converted from it (identical weights)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from vlm.interop.timm import from_timm

    torch.manual_seed(seed)
    peer = TimmViT(img_size=size.image_size, patch_size=size.patch_size, embed_dim=size.width, depth=size.depth,
                   num_heads=size.num_heads, num_classes=0)  # fmt: skip
    return from_timm(peer), peer


def forward_fn(model: nn.Module, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(images)

    return run


def train_fn(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        clear_grads(model)
        model(images).square().mean().backward()

    return run


def compare(
    label: str, ours: Callable[[], object], peer: Callable[[], object], batch: int, settings: Settings
) -> Iterator[Row]:
    """Rows for one workload: images/s, GFLOP/s and share of the GEMM limit, ours vs timm.

    The limit is a square GEMM timed in the same interleaved rounds, so a busy spell slows it as much as the
    models and the share stays meaningful on a shared machine.
    """
    flops = count_flops(peer)  # the same work; the FLOP counter has no formula for the oneDNN linear op
    gemm, gemm_flops = gemm_probe(settings)
    t = interleaved_medians({"ours": ours, "peer": peer, "gemm": gemm}, repeats=settings.repeats)
    limit = gemm_flops / t.pop("gemm") / 1e9
    gflops = {k: flops / s / 1e9 for k, s in t.items()}
    dtype = "bf16" if settings.on_gpu and settings.precision == "bf16-mixed" else "fp32"  # the probe's (CPU: fp32)
    yield make_row(SUITE, f"{label} (b={batch})", batch / t["ours"], "img/s", batch / t["peer"])
    yield make_row(SUITE, f"{label} achieved", gflops["ours"], "GFLOP/s", gflops["peer"])
    yield make_row(SUITE, f"{label}: {dtype} GEMM limit timed alongside", limit, "GFLOP/s")
    share = {k: 100 * g / limit for k, g in gflops.items()}
    yield make_row(SUITE, f"{label} share of GEMM limit", share["ours"], "%", share["peer"])
    peak = nominal_peak_tflops(settings)
    if peak is not None and dtype == "bf16":
        mfu = {k: 100 * g / 1e3 / peak for k, g in gflops.items()}
        yield make_row(SUITE, f"{label} model FLOPs utilisation (of {peak:g} TFLOP/s bf16)", mfu["ours"], "%",
                       mfu["peer"])  # fmt: skip


def run(settings: Settings) -> Iterator[Row]:
    # On a GPU: ViT-B/16 at a batch that fills it; on the CPU the batch of the README's figures.
    batch = settings.pick(256 if settings.on_gpu else 8, 2)
    where = settings.tag
    for size in settings.pick(FULL_SIZES, QUICK_SIZES):
        ours, peer = (m.to(settings.device) for m in vit_pair(size))
        images = torch.randn(batch, 3, size.image_size, size.image_size, generator=torch.Generator().manual_seed(0))
        images = images.to(settings.device)
        ours.eval(), peer.eval()
        for backend in backends(settings):
            cpu_kernels(ours, settings, backend)
            with torch.no_grad(), settings.autocast():
                diff = (ours(images).float() - peer(images).float()).abs().max().item()
            kernels = "" if settings.on_gpu else f", {backend} linear"
            yield make_row(SUITE, f"{size.label} max |ours - timm| forward{kernels}{where}", diff, "abs diff")
        for mode, make_fn in (("forward", forward_fn), ("forward+backward", train_fn)):
            if mode == "forward+backward":
                ours.train(), peer.train()
            for i, backend in enumerate(backends(settings)):
                cpu_kernels(ours, settings, backend)
                tag = "" if i == 0 else f" VLM_CPU_LINEAR={backend}"  # the first rows are the default's
                label = f"{size.label} {size.image_size}px {mode}{tag}{where}"
                ours_fn = settings.wrap(make_fn(ours, images))
                yield from compare(label, ours_fn, settings.wrap(make_fn(peer, images)), batch, settings)
