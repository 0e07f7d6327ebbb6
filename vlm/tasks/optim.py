"""Optimizers and learning-rate schedules for the tasks, injected as LightningCLI callables.

A task takes ``optimizer: OptimizerCallable`` and ``lr_scheduler: LRSchedulerCallable`` (a config names them by
``class_path`` with their ``init_args``). :func:`configure` calls the optimizer with the task's trainable parameters
in two groups (:func:`param_groups`: no weight decay for biases, norms, embeddings and the temperature), then the
schedule with that optimizer, stepped after every optimizer step. :class:`AdamW` and :class:`WarmupCosine` are the
tasks' defaults; any ``torch.optim`` optimizer or scheduler fits the same slots.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning import LightningModule
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``fused=None`` means: fused wherever every parameter allows it (floating point,
    on the CPU or a CUDA device). The fused kernel updates each tensor in one pass; on the CPU it is several times
    faster than the per-tensor loop (``scripts/benchmark.py --suite clip``). The update itself is AdamW's.

    Args:
        params: parameters or parameter groups (:func:`param_groups`).
        lr: peak learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: decoupled weight decay, for groups that do not set their own.
        fused: the fused kernel: ``None`` where possible, ``True`` always, ``False`` never.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, fused: bool | None = None) -> None:
        groups = list(params)
        if fused is None:
            tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
            fused = (bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                           for p in tensors)) or None  # fmt: skip
        super().__init__(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
        # Lightning's mixed-precision plugin refuses to clip the gradients of an optimizer that says it unscales them
        # inside its step, as the fused kernel does. Under bf16 there is nothing to unscale; under fp16 the
        # GradScaler then unscales them before clipping and the step, as for the per-tensor loop. The update is the
        # same either way.
        self._step_supports_amp_scaling = False


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """Linear warm-up over ``warmup_steps`` optimizer steps, then cosine decay to ``min_lr_ratio`` times the peak
    learning rate at ``total_steps``.

    Args:
        optimizer: the optimizer whose learning rates it sets (their values at construction are the peaks).
        warmup_steps: steps of linear warm-up from ``1 / warmup_steps`` of the peak.
        min_lr_ratio: the final learning rate as a fraction of the peak.
        total_steps: the step at which the decay ends; ``None``: the training run's length, set by
            :func:`configure` from the trainer (``estimated_stepping_batches``).
        last_epoch: the index of the last step (-1: a new schedule).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 total_steps: int | None = None, last_epoch: int = -1) -> None:
        self.warmup_steps, self.min_lr_ratio, self.total_steps = warmup_steps, min_lr_ratio, total_steps
        # The first factor does not depend on total_steps, so it may be set after construction.
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = warmup_cosine(self.last_epoch, self.warmup_steps, self.total_steps or 1, self.min_lr_ratio)
        return [base_lr * factor for base_lr in self.base_lrs]


def param_groups(module: nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Splits the trainable parameters into decayed (matrices) and non-decayed ones (biases, norms, embeddings,
    the temperature): decaying a gain or an embedding towards zero only hurts. The decayed group takes the
    optimizer's ``weight_decay`` unless ``weight_decay`` is given."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue  # frozen parameters never reach the optimizer
        is_matrix = p.ndim >= 2 and "embed" not in name and "positional" not in name
        (decay if is_matrix else no_decay).append(p)
    decayed = {"params": decay} if weight_decay is None else {"params": decay, "weight_decay": weight_decay}
    return [decayed, {"params": no_decay, "weight_decay": 0.0}]


def training_steps(task: LightningModule, warmup_steps: int) -> int:
    """The optimizer steps of the task's training run (1 without a trainer; ten warm-ups for an endless run)."""
    total = task.trainer.estimated_stepping_batches if task._trainer is not None else 1
    return int(total) if math.isfinite(total) else max(warmup_steps * 10, 1)


def configure(task: LightningModule, optimizer: OptimizerFactory, lr_scheduler: SchedulerFactory) -> dict:
    """What ``configure_optimizers`` returns: ``optimizer`` over the task's :func:`param_groups`, and
    ``lr_scheduler`` over that optimizer, stepped after every optimizer step."""
    built = optimizer(param_groups(task))
    schedule = lr_scheduler(built)
    if isinstance(schedule, WarmupCosine) and schedule.total_steps is None:
        schedule.total_steps = training_steps(task, schedule.warmup_steps)
    return {"optimizer": built, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def adamw(lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> OptimizerFactory:
    """A task's default optimizer: :class:`AdamW` with these settings (a partial: tasks are pickled by spawned
    processes)."""
    return functools.partial(AdamW, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def warmup_cosine_schedule(warmup_steps: int, min_lr_ratio: float) -> SchedulerFactory:
    """A task's default schedule: :class:`WarmupCosine` over the whole run."""
    return functools.partial(WarmupCosine, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)


__all__ = ["AdamW", "WarmupCosine", "adamw", "configure", "param_groups", "training_steps", "warmup_cosine",
           "warmup_cosine_schedule"]
