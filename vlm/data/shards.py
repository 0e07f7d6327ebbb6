"""Webdataset tar shards: the converter behind ``vlm data shards``, and equal batch counts across ranks.

A shard is a plain tar of samples ``KEY.{png,jpg,...}`` (the image file's bytes, unchanged), ``KEY.txt`` (the
caption) and ``KEY.label.txt`` (the label, when there is one), the layout Hugging Face ``datasets``' ``webdataset``
loader reads (columns ``png`` / ``txt`` / ``label.txt``). Each output directory also gets ``shards.json`` with the
sample count of every shard.

Streaming shards under DDP: :func:`datasets.distributed.split_dataset_by_node` gives every rank its own shards (or
every ``world_size``-th sample) and Hugging Face splits a rank's shards across its dataloader workers, so each
sample is read exactly once per epoch. Ranks can still end up with different numbers of batches (shards of
different sizes), and a rank that stops early would leave the others waiting in the gradient all-reduce forever.
:class:`EqualBatchesDataLoader` makes all ranks stop after the same number of batches (the smallest), the
streaming analogue of ``drop_last``, and resumes mid-epoch: a stream's order is fixed (shards in order, split the
same way across ranks and workers every epoch), so its checkpointed state is the number of batches of the epoch
already trained on, which the resumed loader reads again and drops.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from vlm.data.sources import IMAGE_FALLBACKS, LABEL_FALLBACKS, TEXT_FALLBACKS, load_table, pick_column

log = logging.getLogger("vlm.data")
_SPLITS = ("train", "validation", "test")


@dataclass
class ShardReport:
    """What :func:`write_shards` did: samples written and skipped (by reason) per split, and the shard files."""

    written: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    shards: list[Path] = field(default_factory=list)
    out: Path | None = None

    def summary(self) -> str:
        written = ", ".join(f"{n} {split}" for split, n in self.written.items()) or "0"
        text = f"wrote {written} samples in {len(self.shards)} shards to {self.out}"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} ({why})" for why, n in sorted(self.skipped.items()))
        return text


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _image_bytes(value: Any, root: Path | None) -> tuple[bytes, str] | str:
    """(bytes, extension) of a table's image cell, or the reason it has none."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], Path(value.get("path") or "x.png").suffix.lstrip(".").lower() or "png"
        value = value.get("path")
    if not isinstance(value, str | os.PathLike) or not str(value):
        return "missing image"
    path = Path(value)
    if root is not None and not path.is_absolute():
        path = root / path
    try:
        data = path.read_bytes()
    except OSError:
        return "missing image"
    if not data:
        return "empty image file"
    return data, path.suffix.lstrip(".").lower() or "png"


def _convert_split(source: Path, out: Path, shard_size: int, report: ShardReport, split: str) -> None:
    table = load_table(str(source), split)
    if table.streaming:
        raise ValueError(f"{source}: already shards")
    data = table.data
    image_col = pick_column(data.column_names, "image", IMAGE_FALLBACKS, "image", str(source))
    text_col = pick_column(data.column_names, "caption", TEXT_FALLBACKS, "caption", str(source))
    try:
        label_col: str | None = pick_column(data.column_names, "label", LABEL_FALLBACKS, "label", str(source))
    except ValueError:
        label_col = None
    out.mkdir(parents=True, exist_ok=True)
    index: list[dict[str, Any]] = []
    tar: tarfile.TarFile | None = None
    tmp: Path | None = None

    def close() -> None:
        if tar is not None and tmp is not None:
            tar.close()
            final = tmp.with_suffix("")  # drop ".tmp": a shard appears complete or not at all
            tmp.replace(final)
            report.shards.append(final)

    key = 0
    for row in data:
        caption = row.get(text_col)
        if not isinstance(caption, str) or not caption.strip():
            report.skipped["missing caption"] += 1
            continue
        image = _image_bytes(row.get(image_col), table.root)
        if isinstance(image, str):
            report.skipped[image] += 1
            continue
        if key % shard_size == 0:
            close()
            tmp = out / f"shard-{key // shard_size:06d}.tar.tmp"
            tar = tarfile.open(tmp, "w")
            index.append({"file": tmp.with_suffix("").name, "count": 0})
        name = f"{key:08d}"
        data_bytes, ext = image
        _tar_add(tar, f"{name}.{ext}", data_bytes)
        _tar_add(tar, f"{name}.txt", caption.strip().encode("utf-8"))
        label = row.get(label_col) if label_col else None
        if label is not None and str(label).strip():
            _tar_add(tar, f"{name}.label.txt", str(label).encode("utf-8"))
        index[-1]["count"] += 1
        key += 1
    close()
    report.written[split] += key
    (out / "shards.json").write_text(json.dumps({"total": key, "shards": index}, indent=2) + "\n")


def write_shards(inp: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000) -> ShardReport:
    """Converts an imagefolder (a split directory, or a root with ``train/`` / ``validation/``) or a CSV/JSONL
    file into webdataset shards of ``shard_size`` samples. Rows without a caption or a readable image file are
    skipped and counted. Class files (``classnames.txt``, ``heldout.txt``) next to the splits are copied.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    inp, out = Path(inp), Path(out)
    if not inp.exists():
        raise FileNotFoundError(f"{inp}: no such file or directory")
    report = ShardReport(out=out)
    splits = [s for s in _SPLITS if (inp / s).is_dir()] if inp.is_dir() else []
    if splits:
        for split in splits:
            _convert_split(inp / split, out / split, shard_size, report, split)
        for name in ("classnames.txt", "heldout.txt"):
            if (inp / name).is_file():
                shutil.copyfile(inp / name, out / name)
    else:
        _convert_split(inp, out, shard_size, report, "train")
    if report.skipped:
        log.warning("skipped %d samples while writing shards: %s", sum(report.skipped.values()),
                    dict(report.skipped))
    return report


_GLOO_GROUP: Any = None


def _agreement_group() -> Any:
    """A CPU-capable process group for the per-batch agreement (the default one may be NCCL)."""
    global _GLOO_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _GLOO_GROUP is None:
        _GLOO_GROUP = dist.new_group(backend="gloo")
    return _GLOO_GROUP


class EqualBatchesDataLoader(DataLoader):
    """A DataLoader over a streaming dataset that yields the same number of batches on every rank.

    Before each batch, the ranks agree (one all-reduce of a flag) whether all of them still have one; the epoch
    ends on all ranks as soon as one rank is out, dropping the others' extra batches (as ``drop_last`` does).
    Without torch.distributed it is a plain DataLoader.

    It has Lightning's ``state_dict`` / ``load_state_dict`` protocol: the state is how many batches of the current
    epoch were trained on, and after ``load_state_dict`` the next pass reads that many batches on every rank and
    drops them before yielding. A run resumed with the same world size, batch size and ``num_workers`` (the stream's
    split depends on them) neither repeats nor skips a sample; the price is reading the trained part of the epoch
    once more, at the loader's speed.

    Args:
        *args: DataLoader's arguments.
        position: returns how many batches of the current epoch have been trained on (the data module reads it from
            the trainer's progress); None: the state is always 0.
        **kwargs: DataLoader's keyword arguments.
    """

    def __init__(self, *args: Any, position: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position
        self._skip = 0
        self._pass_ended = False

    def state_dict(self) -> dict[str, int]:
        # A pass that has ended (Lightning fetches one batch ahead, so it knows before the last step) was trained
        # on in full: the resumed run starts the next epoch from its beginning.
        batches = int(self.position()) if self.position is not None and not self._pass_ended else 0
        return {"batches": batches, "batch_size": int(self.batch_size or 0), "num_workers": self.num_workers}

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = (state.get("batch_size", self.batch_size), state.get("num_workers", self.num_workers))
        if saved != (self.batch_size, self.num_workers):
            log.warning("resuming a stream saved with batch_size %s, num_workers %s under batch_size %s, "
                        "num_workers %s: samples of the interrupted epoch may be repeated or skipped",
                        *saved, self.batch_size, self.num_workers)
        self._skip = int(state.get("batches", 0))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # Taken by the pass that yields the first batch (a generator runs only then): one-shot.
        skip, self._skip = self._skip, 0
        self._pass_ended = False
        iterator = super().__iter__()
        for _ in islice(iterator, skip):  # if that ends the stream, the epoch ends below (after the agreement)
            pass
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            yield from iterator
            self._pass_ended = True
            return
        group = _agreement_group()
        dropped = 0
        while True:
            try:
                batch, has_batch = next(iterator), 1
            except StopIteration:
                batch, has_batch = None, 0
            flag = torch.tensor([has_batch], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            if flag.item() == 0:
                dropped += has_batch + sum(1 for _ in iterator) if has_batch else 0
                if dropped:
                    log.warning("rank %d dropped %d batch(es) to keep ranks in step", dist.get_rank(), dropped)
                self._pass_ended = True
                return
            yield batch


__all__ = ["EqualBatchesDataLoader", "ShardReport", "write_shards"]
