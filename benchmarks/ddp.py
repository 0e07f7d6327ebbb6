"""``ddp``: one CLIP training run under Lightning's single-device strategy and the same run under DDP.

A sanity check of the distributed path on one device: DDP's wrapper and gradient all-reduce, the distributed
sampler, and the contrastive loss's feature gathering all run, in a world of one process. From the same weights
on the same batches the two runs must reach the same losses (to float rounding), and DDP should cost little time
(the ratio is the plain strategy's training time over DDP's). Both are ``lightning.Trainer.fit`` with the
settings' device and precision, on random images and captions held in memory, so data loading does not enter.
With several GPUs the same comparison across devices is ``vlm fit ... --trainer.devices N``; the machines this
suite was written for have one.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator

import torch

from benchmarks.core import Row, Settings, make_row

SUITE = "ddp"


class _Pairs(torch.utils.data.Dataset):
    """Random images and caption tokens (start, words, end-of-text), fixed by the seed."""

    def __init__(self, n: int, image_size: int, context: int, vocab: int, sot: int, eot: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, image_size, image_size, generator=gen)
        self.text = torch.randint(1, vocab - 2, (n, context), generator=gen)
        self.text[:, 0] = sot
        self.text[:, -1] = eot

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "text": self.text[i]}


def _model(settings: Settings) -> torch.nn.Module:
    """open_clip's ViT-B/32 layout on a GPU, a small CLIP on the CPU, a tiny one for the tests."""
    from vlm.models.clip import CLIP
    from vlm.models.text import TextTransformer
    from vlm.models.vit import VisionTransformer

    torch.manual_seed(0)
    if settings.quick:
        vision = VisionTransformer(16, 8, width=32, depth=1, num_heads=2)
        return CLIP(vision, TextTransformer(context_length=8, width=32, depth=1, num_heads=2), embed_dim=16)
    if settings.on_gpu:
        vision = VisionTransformer(224, 32, width=768, depth=12, num_heads=12, pre_norm=True, patch_bias=False)
        return CLIP(vision, TextTransformer(context_length=77, width=512, depth=12, num_heads=8), embed_dim=512)
    vision = VisionTransformer(64, 8, width=192, depth=4, num_heads=3)
    return CLIP(vision, TextTransformer(context_length=32, width=192, depth=4, num_heads=3), embed_dim=128)


def _fit(model: torch.nn.Module, data: _Pairs, batch: int, steps: int, strategy: str, settings: Settings):
    """Losses of every step and the seconds the steps after the first two took."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from vlm.callbacks import CPUKernels
    from vlm.tasks.contrastive import ContrastiveTask
    from vlm.tasks.optim import adamw, warmup_cosine_schedule

    class Record(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.times: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))  # a host sync: every step's time is complete
            self.times.append(time.perf_counter())

    record = Record()
    task = ContrastiveTask(model=model, optimizer=adamw(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6),
                           lr_scheduler=warmup_cosine_schedule(warmup_steps=0, min_lr_ratio=0.0))
    trainer = L.Trainer(
        accelerator="gpu" if settings.on_gpu else "cpu",
        devices=1,
        strategy=strategy,
        precision=settings.precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # Lightning's distributed sampler always shuffles training data; one process reads the batches in order.
        use_distributed_sampler=False,
        callbacks=[record, CPUKernels()],  # as the shipped configs: the default CPU kernels, on the CPU only
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, drop_last=True)
    trainer.fit(task, loader)
    return record.losses, record.times[-1] - record.times[1]


def run(settings: Settings) -> Iterator[Row]:
    import torch.distributed as dist

    batch, steps = settings.pick((256, 30) if settings.on_gpu else (32, 12), (4, 4))
    model = _model(settings)
    text = model.text
    data = _Pairs(batch * steps, model.vision.image_size, text.context_length, text.vocab_size, text.vocab_size - 2,
                  text.eot_token_id)  # fmt: skip
    was_initialized = dist.is_available() and dist.is_initialized()
    # Lightning's DDP launcher writes the rendezvous and rank (MASTER_*, LOCAL_RANK, ...) and OMP_NUM_THREADS into
    # this process's environment and may change torch's thread count: a process started later would inherit them
    # and take itself for a DDP worker. Leave the process as it was.
    environ, threads = dict(os.environ), torch.get_num_threads()
    try:
        plain = _fit(copy.deepcopy(model), data, batch, steps, "auto", settings)
        ddp = _fit(copy.deepcopy(model), data, batch, steps, "ddp", settings)
    finally:
        if dist.is_available() and dist.is_initialized() and not was_initialized:
            dist.destroy_process_group()  # the DDP run's one-process group
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
    label = f"CLIP training, {steps} steps of b={batch}{settings.tag}"
    timed = steps - 2
    yield make_row(SUITE, f"{label}: DDP (one process) vs single-device strategy, steps/s", timed / ddp[1], "steps/s",
                   timed / plain[1])  # fmt: skip
    diff = max(abs(a - b) for a, b in zip(plain[0], ddp[0]))
    yield make_row(SUITE, f"{label}: max |loss DDP - loss single-device| over the steps", diff, "abs diff")
    yield make_row(SUITE, f"{label}: last loss under DDP (first {ddp[0][0]:.4f})", ddp[0][-1], "loss")
