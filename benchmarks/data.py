"""``data``: does the data pipeline keep up with training?

Images per second that the default CLIP config's data module (``configs/clip/shapes.yaml``: the built-in shapes,
default transforms, its batch size) delivers, against images per second that the config's training step
(forward, loss, backward, AdamW) consumes on the same machine. A ratio above 1 means loading is not the
bottleneck. Both the default in-memory cache and reading the PNGs from disk at every epoch are measured.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.core import Row, Settings, make_row, median_time

SUITE = "data"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip" / "shapes.yaml"


def loader_rate(loader, max_batches: int) -> float:
    """Images per second over up to ``max_batches`` batches (after the first, which pays one-off costs)."""
    it = iter(loader)
    next(it)
    count, start = 0, time.perf_counter()
    for i, batch in enumerate(it):
        count += batch["image"].shape[0]
        if i + 1 >= max_batches:
            break
    return count / (time.perf_counter() - start)


def run(settings: Settings) -> Iterator[Row]:
    import yaml

    from vlm.data.builtin import ShapesSource
    from vlm.data.datamodules import ImageTextDataModule
    from vlm.formats import build_task

    config = yaml.safe_load(CONFIG.read_text())
    torch.manual_seed(0)
    task = build_task(copy.deepcopy(config["model"]))
    data_args = dict(config["data"]["init_args"])
    source_args = data_args.pop("source")["init_args"]
    batch = settings.pick(data_args.get("batch_size", 128), 8)
    num_train = settings.pick(16 * batch, 4 * batch)
    with tempfile.TemporaryDirectory() as tmp:
        source = ShapesSource(**{**source_args, "data_dir": tmp, "num_train": num_train, "num_val": 36})
        data_args.update(source=source, batch_size=batch, tokenizer=task.tokenizer, image_size=task.image_size,
                         image_mean=task.image_mean, image_std=task.image_std)
        cls = ImageTextDataModule
        start = time.perf_counter()
        dm = cls(**data_args)
        dm.prepare_data()
        yield make_row(SUITE, f"generate {num_train} + 36 shapes images on disk", time.perf_counter() - start, "s")
        for in_memory in (True, False):
            dm = cls(**{**data_args, "in_memory": in_memory})
            start = time.perf_counter()
            dm.setup("fit")
            what = "in-memory cache (default)" if in_memory else "decoded from disk every epoch"
            if in_memory:
                rate = num_train / (time.perf_counter() - start)
                yield make_row(SUITE, f"data module setup: decode {num_train} images into memory", rate, "img/s")
            rate = loader_rate(dm.train_dataloader(), max_batches=settings.pick(15, 3))
            yield make_row(SUITE, f"train loader delivers (b={batch}), {what}", rate, "img/s")
            if in_memory:
                delivered = rate
        sample = next(iter(dm.train_dataloader()))
    optimizer = task.configure_optimizers()["optimizer"]
    task.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        task.compute_loss(sample["image"], sample["text"]).backward()
        optimizer.step()

    consumed = batch / median_time(step, repeats=settings.repeats)
    yield make_row(SUITE, f"training step consumes (b={batch}, default CLIP config)", consumed, "img/s")
    yield make_row(SUITE, "loader (in-memory) / training step throughput", delivered / consumed, "x")

