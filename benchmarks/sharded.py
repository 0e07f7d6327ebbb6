"""The ``memory`` suite's sharding rows: per-rank memory of the default Flamingo config's training step (frozen tower
and decoder) under FSDP2 (``vlm.tasks.sharding.shard_layers``) against DDP, two ranks, the same global batch.

Two worker processes (``torch.multiprocessing.spawn``; gloo on the CPU, NCCL on two GPUs) each run DDP, then FSDP2,
from the same weights: one step to allocate the optimizer state, then a measured step (forward, loss, backward,
AdamW). Per rank, the figure is what it holds before the step (parameters and optimizer state: this rank's shards
under FSDP2) plus the step's peak above that (:func:`~benchmarks.core.peak_memory_bytes`: gradients,
activations, the gathered layers); on CUDA it is the allocator's own peak. The larger rank is reported. DDP's
gradient buckets (one more copy of the trainable gradients, allocated when the model is wrapped) are not counted on
the CPU. With fewer than two GPUs the rows are skipped.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from benchmarks.core import Row, Settings, make_row, peak_memory_bytes, skip_row

MIB = 2**20
RANKS = 2


class _Loss(nn.Module):
    """The task's loss as a ``forward``, so DDP's hooks run around it."""

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.task = task

    def forward(self, images, ids, labels):
        return self.task.compute_loss(images, ids, labels)


def _held_bytes(task: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's parameters and optimizer state (local shards of sharded tensors)."""

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(local(p) for p in task.parameters()) + sum(local(v) for v in state)


def _measure(rank: int, mode: str, batch: int, settings: Settings) -> dict[str, float]:
    from benchmarks.flamingo import default_flamingo_task, flamingo_step
    from vlm.tasks.sharding import shard_layers

    device = torch.device("cuda", rank) if settings.on_gpu else torch.device("cpu")
    task = default_flamingo_task().to(device).train()
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        shard_layers(task.model, init_device_mesh(device.type, (RANKS,)))
        step = flamingo_step(task, batch, settings)
    else:
        wrapped = nn.parallel.DistributedDataParallel(_Loss(task), device_ids=[rank] if settings.on_gpu else None)
        step = flamingo_step(task, batch, settings, loss=wrapped)
    step()  # allocates the optimizer state
    if settings.on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _held_bytes(task, step.optimizer) + peak_memory_bytes(step, "cpu")
    return {"peak": peak / MIB, "held": _held_bytes(task, step.optimizer) / MIB}


def _worker(rank: int, port: int, batch: int, settings: Settings, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # this child's own environment only
    if not settings.on_gpu:
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if settings.on_gpu else "gloo", rank=rank, world_size=RANKS)
    try:
        result = {mode: _measure(rank, mode, batch, settings) for mode in ("ddp", "fsdp")}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def sharded_memory_rows(suite: str, settings: Settings) -> Iterator[Row]:
    if settings.on_gpu and torch.cuda.device_count() < RANKS:
        yield skip_row(suite, f"FSDP2 vs DDP per-rank memory needs {RANKS} GPUs, this machine has "
                              f"{torch.cuda.device_count()}")
        return
    batch = settings.pick(64, 4)  # global, split over the ranks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_worker, args=(port, batch // RANKS, settings, out), nprocs=RANKS, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(RANKS)]
    worst = {mode: {k: max(r[mode][k] for r in ranks) for k in ("peak", "held")} for mode in ("ddp", "fsdp")}
    label = f"Flamingo default config step{settings.tag} (global b={batch}, {RANKS} ranks)"
    yield make_row(suite, f"{label}: per-rank peak memory, FSDP2 vs DDP", worst["fsdp"]["peak"], "MiB",
                   peer=worst["ddp"]["peak"])
    yield make_row(suite, f"{label}: per-rank parameters + optimizer state, FSDP2 vs DDP", worst["fsdp"]["held"],
                   "MiB", peer=worst["ddp"]["held"])


__all__ = ["sharded_memory_rows"]
