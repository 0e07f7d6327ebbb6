"""Optimizer and learning-rate schedule shared by the tasks: AdamW, linear warm-up, cosine decay."""

from __future__ import annotations

import math

import torch
from lightning import LightningModule
from torch import nn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Splits the trainable parameters into decayed (matrices) and non-decayed ones (biases, norms, embeddings,
    the temperature): decaying a gain or an embedding towards zero only hurts."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue  # frozen parameters never reach the optimizer
        is_matrix = p.ndim >= 2 and "embed" not in name and "positional" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    task: LightningModule,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> dict:
    """AdamW over the task's trainable parameters with a per-step warm-up + cosine schedule."""
    groups = param_groups(task, weight_decay)
    # The fused kernel updates each tensor in one pass; on CPU it is ~5x faster than the per-tensor loop
    # (ViT-B/32 CLIP, 151M parameters: 0.28 s vs 1.4 s per step; scripts/benchmark.py --suite clip).
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)
    total = task.trainer.estimated_stepping_batches if task._trainer is not None else 1
    total = int(total) if math.isfinite(total) else max(warmup_steps * 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total, min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
