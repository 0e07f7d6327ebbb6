"""``memory``: peak memory of training steps.

- A ViT-B/16 CLIP step (forward of both towers, contrastive loss, backward) with and without gradient
  checkpointing. Gradients are allocated before measuring, so the peak is the activation memory (saved tensors
  and temporaries) that checkpointing exists to cut.
- Contrastive gradient accumulation that keeps every negative (``ContrastiveTask(accumulate_micro_batches=k)``):
  the same ViT-B/16 CLIP step over one batch, encoded whole vs k micro-batches at a time; the peer is the
  whole-batch step (same gradient, tested), so the memory ratio is what accumulation saves and the time ratio what
  its second forward pass costs.
- A Flamingo step with the vision tower and decoder frozen (the recipe) against the same model with everything
  trainable: time and peak memory (frozen parameters need no weight gradients and no saved inputs for them).
- The same frozen-recipe step on two ranks, FSDP2 against DDP at the same global batch: per-rank peak memory
  (:mod:`benchmarks.sharded`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from benchmarks.core import Row, Settings, cpu_kernels, interleaved_medians, make_row, peak_memory_bytes
from benchmarks.flamingo import flamingo_memory_rows

SUITE = "memory"
MIB = 2**20


def vit_b16_clip(quick: bool) -> nn.Module:
    """A ViT-B/16 CLIP (OpenAI layout: pre-norm ViT, 12x512 text tower), or a tiny one."""
    from vlm.models.clip import CLIP
    from vlm.models.text import TextTransformer
    from vlm.models.vit import VisionTransformer

    torch.manual_seed(0)
    if quick:
        vision = VisionTransformer(32, 8, width=64, depth=2, num_heads=2, pre_norm=True, patch_bias=False)
        return CLIP(vision, TextTransformer(context_length=16, width=64, depth=2, num_heads=2), embed_dim=32)
    vision = VisionTransformer(224, 16, width=768, depth=12, num_heads=12, pre_norm=True, patch_bias=False,
                               norm_eps=1e-5)  # fmt: skip
    return CLIP(vision, TextTransformer(context_length=77, width=512, depth=12, num_heads=8), embed_dim=512)


def clip_checkpointing_rows(settings: Settings) -> Iterator[Row]:
    from vlm.tasks.contrastive import ContrastiveTask

    model = cpu_kernels(vit_b16_clip(settings.quick).to(settings.device), settings)
    task = ContrastiveTask(model=model)
    batch = settings.pick(128 if settings.on_gpu else 8, 2)
    images, text = clip_batch(model, batch, settings.device)

    def step() -> None:
        task.zero_grad(set_to_none=False)  # gradients stay allocated: only activations are measured
        with settings.autocast():
            loss = task.compute_loss(images, text)
        loss.backward()

    step()  # allocates the gradients
    peaks = {}
    for checkpointing in (False, True):
        model.vision.grad_checkpointing = model.text.grad_checkpointing = checkpointing
        peaks[checkpointing] = peak_memory_bytes(step, settings.device) / MIB
    label = ("ViT-B/16 CLIP" if not settings.quick else "tiny CLIP") + settings.tag
    yield make_row(SUITE, f"{label} step activation peak (b={batch}), no checkpointing", peaks[False], "MiB")
    yield make_row(SUITE, f"{label} step activation peak (b={batch}), gradient checkpointing", peaks[True], "MiB")
    yield make_row(SUITE, f"{label} activation memory cut by gradient checkpointing",
                   100 * (1 - peaks[True] / peaks[False]), "%")  # fmt: skip
    model.vision.grad_checkpointing = model.text.grad_checkpointing = False
    times = interleaved_medians({"off": step, "on": _with_checkpointing(model, step)}, repeats=min(settings.repeats, 3))
    yield make_row(SUITE, f"{label} step time (b={batch}), no checkpointing", times["off"], "s")
    yield make_row(SUITE, f"{label} step time (b={batch}), gradient checkpointing", times["on"], "s")


def accumulation_rows(settings: Settings) -> Iterator[Row]:
    from vlm.tasks.contrastive import ContrastiveTask

    model = cpu_kernels(vit_b16_clip(settings.quick).to(settings.device), settings)
    k = 4
    whole, micro = ContrastiveTask(model=model), ContrastiveTask(model=model, accumulate_micro_batches=k)
    batch = settings.pick(256 if settings.on_gpu else 16, 4)
    images, text = clip_batch(model, batch, settings.device)

    def step_whole() -> None:
        model.zero_grad(set_to_none=False)  # gradients stay allocated: only activations are measured
        with settings.autocast():
            loss = whole.compute_loss(images, text)
        loss.backward()

    def step_micro() -> None:
        model.zero_grad(set_to_none=False)
        with settings.autocast():
            loss = micro.accumulated_loss(images, text)
        loss.backward()

    step_whole()  # allocates the gradients
    peaks = {name: peak_memory_bytes(fn, settings.device) / MIB
             for name, fn in (("whole", step_whole), ("micro", step_micro))}  # fmt: skip
    label = ("ViT-B/16 CLIP" if not settings.quick else "tiny CLIP") + settings.tag
    yield make_row(SUITE, f"{label} step activation peak (b={batch}): {k} accumulated micro-batches vs whole batch",
                   peaks["micro"], "MiB", peer=peaks["whole"])  # fmt: skip
    times = interleaved_medians({"whole": step_whole, "micro": step_micro}, repeats=min(settings.repeats, 3))
    yield make_row(SUITE, f"{label} step time (b={batch}): {k} accumulated micro-batches vs whole batch",
                   times["micro"], "s", peer=times["whole"])  # fmt: skip


def clip_batch(model: nn.Module, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and full-length token rows (ending in end-of-text) for ``model``, on ``device``."""
    gen = torch.Generator().manual_seed(0)
    size, ctx = model.vision.image_size, model.text.context_length
    images = torch.randn(batch, 3, size, size, generator=gen)
    text = torch.randint(1, model.text.vocab_size - 1, (batch, ctx), generator=gen)
    text[:, -1] = model.text.eot_token_id
    return images.to(device), text.to(device)


def _with_checkpointing(model: nn.Module, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        model.vision.grad_checkpointing = model.text.grad_checkpointing = True
        try:
            step()
        finally:
            model.vision.grad_checkpointing = model.text.grad_checkpointing = False

    return run


def run(settings: Settings) -> Iterator[Row]:
    from benchmarks.sharded import sharded_memory_rows

    yield from clip_checkpointing_rows(settings)
    yield from accumulation_rows(settings)
    yield from flamingo_memory_rows(SUITE, settings)
    yield from sharded_memory_rows(SUITE, settings)
