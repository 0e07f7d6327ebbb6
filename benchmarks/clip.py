"""``clip``: our CLIP against open_clip's, same configuration (ViT-B/32) and identical weights.

Image encoding and text encoding (inference; on the CPU with :func:`vlm.kernels.use_cpu_kernels` applied as the
entry points apply it, with the default backend, then the other one), and one full training step (default
backend): forward of both towers, the contrastive loss, backward and AdamW. Ours runs the project's
own training path (``ContrastiveTask.compute_loss`` and the optimizer its ``configure_optimizers`` builds); open_clip
runs its ``ClipLoss`` and the ``AdamW`` its training script builds, with the same hyper-parameters and the same
decay / no-decay split. On a GPU (and in the quick test run) also the model FLOPs utilisation of a ViT-B/16 CLIP
training step (:func:`utilisation_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

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

SUITE = "clip"

CAPTIONS = (
    "a photo of a small red circle on a grey background",
    "a large blue square left of a small green triangle",
    "two yellow stars",
    "a purple hexagon above an orange cross, with some noise in the background and a lot of words",
)


def open_clip_config(quick: bool, patch_size: int = 32) -> dict:
    """open_clip's ``ViT-B-32`` (or ``ViT-B-16``) model config, or a tiny one."""
    if quick:
        vision = dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32)
        return dict(embed_dim=32, vision_cfg=vision, text_cfg=dict(context_length=16, width=64, heads=2, layers=2))
    vision = dict(image_size=224, layers=12, width=768, patch_size=patch_size)
    return dict(embed_dim=512, vision_cfg=vision, text_cfg=dict(context_length=77, width=512, heads=8, layers=12))


def clip_pair(quick: bool, seed: int = 0, patch_size: int = 32) -> tuple[nn.Module, nn.Module]:
    """Our CLIP and open_clip's, holding identical weights (ours converted from open_clip's)."""
    import open_clip

    from vlm.interop.open_clip import from_open_clip

    torch.manual_seed(seed)
    peer = open_clip.CLIP(**open_clip_config(quick, patch_size))
    return from_open_clip(peer), peer


def clip_inputs(peer: nn.Module, batch: int, text_batch: int, device: str = "cpu") -> tuple[Tensor, Tensor]:
    from vlm.data.tokenizer import CLIPTokenizer

    size = peer.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(text_batch)]
    return images.to(device), CLIPTokenizer(peer.context_length)(captions).to(device)


def train_steps(ours: nn.Module, peer: nn.Module, images: Tensor, text: Tensor, settings: Settings | None = None):
    """One training step for each side, as the function to time, plus the first-step losses and each side's
    forward + loss + backward without the optimizer (what model FLOPs count). Forward and loss run under the
    settings' precision, backward outside it (as Lightning does)."""
    from open_clip.loss import ClipLoss

    from vlm.tasks.contrastive import ContrastiveTask
    from vlm.tasks.optim import adamw, param_groups, warmup_cosine_schedule

    settings = settings or Settings()
    task = ContrastiveTask(model=ours, optimizer=adamw(lr=1e-5, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6),
                           lr_scheduler=warmup_cosine_schedule(warmup_steps=0, min_lr_ratio=0.0))
    task_opt = task.configure_optimizers()["optimizer"]
    peer_loss_fn = ClipLoss()
    groups = param_groups(peer, 0.1)
    peer_opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6)

    def ours_loss() -> Tensor:
        with settings.autocast():
            return task.compute_loss(images, text)

    def peer_loss() -> Tensor:
        with settings.autocast():
            return peer_loss_fn(*peer(images, text))

    with torch.no_grad():
        loss_diff = abs(ours_loss().item() - peer_loss().item())

    def ours_pass() -> None:
        task_opt.zero_grad(set_to_none=True)
        ours_loss().backward()

    def peer_pass() -> None:
        peer_opt.zero_grad(set_to_none=True)
        peer_loss().backward()

    def ours_step() -> None:
        ours_pass()
        task_opt.step()
        ours.clamp_logit_scale()

    def peer_step() -> None:
        peer_pass()
        peer_opt.step()
        with torch.no_grad():
            peer.logit_scale.clamp_(0, math.log(100))

    return ours_step, peer_step, loss_diff, (ours_pass, peer_pass)


def run(settings: Settings) -> Iterator[Row]:
    batch, text_batch = settings.pick((256, 256) if settings.on_gpu else (16, 64), (2, 4))
    ours, peer = (m.to(settings.device) for m in clip_pair(settings.quick))
    cpu_kernels(ours, settings)
    images, text = clip_inputs(peer, batch, text_batch, settings.device)
    ours.eval(), peer.eval()
    label = ("ViT-B/32" if not settings.quick else "tiny") + settings.tag
    with torch.no_grad(), settings.autocast():
        diff_i = (ours.encode_image(images) - peer.encode_image(images, normalize=True)).abs().max().item()
        diff_t = (ours.encode_text(text) - peer.encode_text(text, normalize=True)).abs().max().item()
    yield make_row(SUITE, f"{label} image encode max |ours - open_clip|", diff_i, "abs diff")
    yield make_row(SUITE, f"{label} text encode max |ours - open_clip|", diff_t, "abs diff")
    longest = int((text != 0).sum(dim=1).max())
    for i, backend in enumerate(backends(settings)):  # the default CPU kernels first, then the other backend
        cpu_kernels(ours, settings, backend)
        tag = "" if i == 0 else f" VLM_CPU_LINEAR={backend}"
        with torch.no_grad():
            t = interleaved_medians(
                {"ours": settings.wrap(lambda: ours.encode_image(images)),
                 "peer": settings.wrap(lambda: peer.encode_image(images, normalize=True))},
                repeats=settings.repeats,
            )  # fmt: skip
            rate = {k: batch / v for k, v in t.items()}
            yield make_row(SUITE, f"{label} image encode (b={batch}){tag}", rate["ours"], "img/s", rate["peer"])
            t = interleaved_medians(
                {"ours": settings.wrap(lambda: ours.encode_text(text)),
                 "peer": settings.wrap(lambda: peer.encode_text(text, normalize=True))},
                repeats=settings.repeats,
            )  # fmt: skip
        name = f"{label} text encode (b={text_batch}, captions of <= {longest} tokens in a {text.shape[1]} context)"
        yield make_row(SUITE, name + tag, text_batch / t["ours"], "texts/s", text_batch / t["peer"])
    cpu_kernels(ours, settings)  # training with the default, as the CPUKernels callback applies it
    ours.train(), peer.train()
    ours_step, peer_step, loss_diff, _ = train_steps(ours, peer, images, text[:batch], settings)
    yield make_row(SUITE, f"{label} train step first loss |ours - open_clip|", loss_diff, "abs diff")
    t = interleaved_medians({"ours": ours_step, "peer": peer_step}, repeats=settings.repeats)
    yield make_row(SUITE, f"{label} train step (b={batch}: fwd, loss, bwd, AdamW)", t["ours"], "s", t["peer"])
    clear_grads(ours), clear_grads(peer)
    if settings.on_gpu or settings.quick:
        yield from utilisation_rows(settings)


def utilisation_rows(settings: Settings) -> Iterator[Row]:
    """Model FLOPs utilisation of a ViT-B/16 CLIP training step (forward, loss, backward, AdamW), ours and
    open_clip's: each side's own FLOPs of forward + loss + backward (ours stops the text tower at the longest
    caption, so it runs fewer) per second of the whole step, as a share of the GPU's nominal dense bf16 peak (the
    settings' ``peak_tflops`` first), or, where that is unknown (the CPU), of the GEMM limit timed alongside.

    Only on a GPU (and with ``quick`` sizes, for the tests): on the development CPUs a ViT-B/16 step at a useful
    batch takes minutes, and the ``vit`` suite's forward+backward share already answers the question there.
    """
    batch = settings.pick(256, 2)
    ours, peer = (m.to(settings.device) for m in clip_pair(settings.quick, patch_size=16))
    cpu_kernels(ours, settings)
    images, text = clip_inputs(peer, batch, batch, settings.device)
    ours.train(), peer.train()
    ours_step, peer_step, _, (ours_pass, peer_pass) = train_steps(ours, peer, images, text, settings)
    flops = {"ours": count_flops(ours_pass), "peer": count_flops(peer_pass)}
    gemm, gemm_flops = gemm_probe(settings)
    t = interleaved_medians({"ours": ours_step, "peer": peer_step, "gemm": gemm}, repeats=settings.repeats)
    achieved = {k: flops[k] / t[k] / 1e12 for k in ("ours", "peer")}
    label = ("ViT-B/16 CLIP" if not settings.quick else "tiny CLIP") + settings.tag
    yield make_row(SUITE, f"{label} train step (b={batch}: fwd, loss, bwd, AdamW)", t["ours"], "s", t["peer"])
    yield make_row(SUITE, f"{label} train step model TFLOP/s (own FLOPs)", achieved["ours"], "TFLOP/s",
                   achieved["peer"])  # fmt: skip
    peak = nominal_peak_tflops(settings)
    if peak is not None and settings.precision == "bf16-mixed":
        of = f"of the nominal {peak:g} TFLOP/s bf16 peak"
    else:
        peak, of = gemm_flops / t["gemm"] / 1e12, "of the GEMM limit timed alongside"
    yield make_row(SUITE, f"{label} train step model FLOPs utilisation ({of})", 100 * achieved["ours"] / peak, "%",
                   100 * achieved["peer"] / peak)  # fmt: skip
    clear_grads(ours), clear_grads(peer)
