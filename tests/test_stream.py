"""Streaming at scale, small: ``scripts/make_stream.py`` writes shards vlm streams; two ranks x two dataloader
workers read every sample exactly once per epoch; a stream resumed mid-epoch neither repeats nor skips a sample.

Ranks are simulated in one process: the data module takes its rank and world size from its trainer, and a
stand-in trainer gives them (the real 2-process DDP run is in ``tests/test_data_shards.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_data_resume import Recorder

from vlm.data.datamodules import ImageTextDataModule
from vlm.data.shards import EqualBatchesDataLoader
from vlm.data.tokenizer import CLIPTokenizer

SCRIPT = Path(__file__).parents[1] / "scripts" / "make_stream.py"
NUM, SHARD = 800, 100  # 8 shards: 4 per rank, 2 per dataloader worker
_KEY = re.compile(r"shard-(\d{6})\.tar:(\d{8})\.png$")


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), "--num", str(NUM), "--shard-size", str(SHARD),
                             "--image-size", "16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {NUM} samples in 8 shards" in result.stdout
    return out


def _dm(source, rank=0, world=1, num_workers=0, batch_size=25, cls=ImageTextDataModule):
    dm = cls(train=str(source), batch_size=batch_size, num_workers=num_workers, tokenizer=CLIPTokenizer(8),
             image_size=8, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)  # all the data module reads from a trainer
    dm.setup("fit")
    return dm


def _key(path: str) -> int:
    """The sample key of a batch path ``.../shard-NNNNNN.tar:KKKKKKKK.png``, checked against its shard."""
    match = _KEY.search(path)
    assert match, path
    shard, key = int(match[1]), int(match[2])
    assert key // SHARD == shard, path
    return key


def _keys(loader) -> list[int]:
    return [_key(p) for batch in loader for p in batch["path"]]


def test_make_stream_output_streams_through_the_data_module(stream):
    assert sorted(p.name for p in stream.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(8)]
    assert not list(stream.glob("*.tmp"))
    dm = _dm(stream, batch_size=32)
    batches = list(dm.train_dataloader())
    assert len(batches) == NUM // 32  # 800 = 25 x 32: drop_last drops nothing
    batch = batches[0]
    assert batch["image"].shape == (32, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["image"].std() > 0.1  # real pixels: a coloured square on grey
    assert all(re.fullmatch(r"a (small |large )?\w+ square", c) for c in batch["caption"])
    assert batch["text"].shape == (32, 8)  # the tokenizer's ids
    assert sorted(k for b in batches for k in map(_key, b["path"])) == list(range(NUM))
    assert dm.skipped["train"] == 0


@pytest.mark.parametrize("shards", [8, 7])  # 8: split by shard (4 per rank); 7: split by example
def test_two_ranks_two_workers_see_every_sample_exactly_once_per_epoch(stream, shards):
    source = str(stream / f"shard-{{000000..{shards - 1:06d}}}.tar")
    per_epoch: list[list[int]] = [[], []]
    per_rank = []
    for rank in (0, 1):
        dm = _dm(source, rank=rank, world=2, num_workers=2, batch_size=25 if shards == 8 else 10)
        loader = dm.train_dataloader()
        assert isinstance(loader, EqualBatchesDataLoader) and loader.num_workers == 2
        for epoch in (0, 1):
            keys = _keys(loader)
            per_epoch[epoch] += keys
            if epoch == 0:
                per_rank.append(set(keys))
    for keys in per_epoch:
        assert len(keys) == shards * SHARD and sorted(keys) == list(range(shards * SHARD))  # every key, once
    assert len(per_rank[0]) == len(per_rank[1]) == shards * SHARD // 2 and not per_rank[0] & per_rank[1]


def test_a_resumed_stream_reads_exactly_the_rest_of_the_epoch(stream):
    """Two ranks x two workers: stop each rank after k batches, resume a new loader from its state."""
    k, batch_size = 3, 25
    union: list[int] = []
    for rank in (0, 1):
        full_loader = _dm(stream, rank=rank, world=2, num_workers=2).train_dataloader()
        full_loader.position = lambda: 16
        full = _keys(full_loader)
        assert len(full) == 400
        assert full_loader.state_dict()["batches"] == 0  # an ended pass: a resumed run starts the next epoch
        loader = _dm(stream, rank=rank, world=2, num_workers=2).train_dataloader()
        loader.position = lambda: k  # what the data module reads off the trainer's progress
        state = loader.state_dict()
        assert state == {"batches": k, "batch_size": batch_size, "num_workers": 2}
        resumed = _dm(stream, rank=rank, world=2, num_workers=2).train_dataloader()
        resumed.load_state_dict(state)
        rest = _keys(resumed)
        assert rest == full[k * batch_size:]  # the same order, from batch k on: nothing repeated or skipped
        assert _keys(resumed) == full  # the skip is one-shot: the next epoch is whole again
        union += full[: k * batch_size] + rest
    assert sorted(union) == list(range(NUM))


def _fit(source, root, ckpt_path=None, **trainer_args):
    task = Recorder()
    dm = ImageTextDataModule(train=source, batch_size=25, tokenizer=CLIPTokenizer(8), image_size=8,
                               image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root, num_sanity_val_steps=0,
                         callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)],
                         **trainer_args)
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return task.seen


@pytest.mark.parametrize("stop_at", [3, 8, 11])  # mid-epoch 0, exactly at the end of epoch 0, mid-epoch 1
def test_lightning_resume_of_a_stream_continues_where_it_stopped(stream, tmp_path, stop_at):
    source = str(stream / "shard-{000000..000001}.tar")  # 200 samples: 8 batches of 25 per epoch
    full = _fit(source, tmp_path / "full", max_epochs=2)
    assert len(full) == 16 and len({b for _, b in full[:8]}) == 8
    first = _fit(source, tmp_path / "run", max_steps=stop_at)
    rest = _fit(source, tmp_path / "run", ckpt_path=str(tmp_path / "run" / "ckpt" / "last.ckpt"), max_epochs=2)
    assert first + rest == full
