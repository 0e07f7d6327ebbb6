"""Does a webdataset stream keep up with training? Samples per second per rank, loader against training step.

Streams the shards in SHARDS (e.g. written by ``scripts/make_stream.py``) through vlm's own training path:
:class:`~vlm.data.datamodules.ImageTextDataModule` with the task's tokenizer, image size and normalisation from
``configs/clip/shapes.yaml`` (batch size 128 unless ``--batch-size``), its training loader
(:class:`~vlm.data.shards.EqualBatchesDataLoader`), for ``--batches`` batches after the first, with 0, 1 and 2
dataloader workers, as rank 0 of a world of 1 and of 2. The data module takes its rank and world size from its
trainer; a stand-in trainer gives them here, so rank 0 reads exactly the shards it would read under DDP (world 2:
half of them), in one process. The other rank is not running: on a machine whose cores the ranks share, the
figure is an upper bound. Then it times the config's training step (forward, loss, backward, AdamW) on a batch of
the same shape: ``--steps`` steps after 2 warm-up steps.

Usage: ``python scripts/stream_throughput.py SHARDS [--batches 200] [--workers 0 1 2] [--worlds 1 2] [--steps 10]
[--batch-size 128] [--json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip" / "shapes.yaml"


def build_task() -> Any:
    import yaml

    from vlm.formats import build_task as build

    torch.manual_seed(0)
    return build(copy.deepcopy(yaml.safe_load(CONFIG.read_text())["model"]))


def data_module(shards: str, task: Any, batch_size: int, num_workers: int, rank: int, world: int) -> Any:
    """The training data module of ``rank`` in a world of ``world``, set up on ``shards``."""
    from vlm.data.datamodules import ImageTextDataModule

    dm = ImageTextDataModule(train=shards, batch_size=batch_size, num_workers=num_workers, tokenizer=task.tokenizer,
                             image_size=task.image_size, image_mean=task.image_mean, image_std=task.image_std)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)  # what _rank() reads from a real trainer
    dm.setup("fit")
    return dm


def loader_rate(dm: Any, batches: int) -> tuple[float, int]:
    """(samples/s over ``batches`` batches after the first, which pays worker start-up, samples timed)."""
    it = iter(dm.train_dataloader())
    next(it)
    count, start = 0, time.perf_counter()
    for i, batch in enumerate(it):
        count += batch["image"].shape[0]
        if i + 1 >= batches:
            break
    return count / (time.perf_counter() - start), count


def step_rate(task: Any, batch: dict[str, Any], steps: int, warmup: int = 2) -> float:
    """Samples/s of the task's training step (forward, loss, backward, optimizer step) on ``batch``."""
    optimizer = task.configure_optimizers()["optimizer"]
    task.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        task.compute_loss(batch["image"], batch["text"]).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch["image"].shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="folder of webdataset .tar shards")
    parser.add_argument("--batches", type=int, default=200, help="batches timed per loader (after the first)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="dataloader worker counts")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes (rank 0 is measured)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="one JSON object per measurement")
    args = parser.parse_args(argv)
    if not Path(args.shards).is_dir() or not any(Path(args.shards).glob("*.tar")):
        print(f"error: {args.shards}: no .tar shards there", file=sys.stderr)
        return 2

    def report(what: str, rate: float, **extra: Any) -> None:
        if args.json:
            print(json.dumps({"what": what, "samples_per_s": round(rate, 1), **extra}), flush=True)
        else:
            print(f"{what:<58} {rate:9.1f} samples/s", flush=True)

    task = build_task()
    delivered = {}
    for world in args.worlds:
        for workers in args.workers:
            dm = data_module(args.shards, task, args.batch_size, workers, rank=0, world=world)
            rate, count = loader_rate(dm, args.batches)
            delivered[world, workers] = rate
            report(f"loader, rank 0 of {world}, {workers} worker(s), b={args.batch_size}", rate, world_size=world,
                   num_workers=workers, samples=count)
    batch = next(iter(data_module(args.shards, task, args.batch_size, 0, rank=0, world=1).train_dataloader()))
    consumed = step_rate(task, batch, args.steps)
    report(f"training step (configs/clip/shapes.yaml), b={args.batch_size}", consumed, steps=args.steps,
           threads=torch.get_num_threads())
    for (world, workers), rate in delivered.items():
        ratio = rate / consumed
        if args.json:
            print(json.dumps({"what": "loader / step", "world_size": world, "num_workers": workers,
                              "ratio": round(ratio, 2)}))
        else:
            print(f"loader / step, rank 0 of {world}, {workers} worker(s): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
