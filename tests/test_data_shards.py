"""Webdataset shards: the converter, streaming through the data module, exactly-once reading under 2-rank DDP."""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from conftest import run_job

from vlm.__main__ import main as vlm_main
from vlm.data import shapes as S
from vlm.data.datamodules import ImageTextDataModule
from vlm.data.shards import EqualBatchesDataLoader, write_shards
from vlm.data.tokenizer import CLIPTokenizer

sys.path.insert(0, str(Path(__file__).parent))  # for ddp_data_shards, next to this file


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    S.generate_shapes(root, train=40, val=36, seed=0, image_size=32, processes=1)
    return root


def _keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_cli_converts_an_imagefolder_root(shapes_root, tmp_path, capsys):
    out = tmp_path / "shards"
    assert vlm_main(["data", "shards", "--in", str(shapes_root), "--out", str(out), "--shard-size", "16"]) == 0
    assert "wrote 40 train, 36 validation samples in 6 shards" in capsys.readouterr().out
    train = sorted((out / "train").glob("*.tar"))
    assert [p.name for p in train] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert _keys(train[0])[:3] == ["00000000.png", "00000000.txt", "00000000.label.txt"]
    index = json.loads((out / "train" / "shards.json").read_text())
    assert index["total"] == 40 and [s["count"] for s in index["shards"]] == [16, 16, 8]
    assert (out / "classnames.txt").read_text() == (shapes_root / "classnames.txt").read_text()
    with tarfile.open(train[0]) as tar:  # image bytes are copied unchanged
        assert tar.extractfile("00000000.png").read() == (shapes_root / "train" / "00000.png").read_bytes()
        caption = json.loads((shapes_root / "train" / "metadata.jsonl").open().readline())["caption"]
        assert tar.extractfile("00000000.txt").read().decode() == caption
    # streamed back, the validation shards' batches flag the labels of heldout.txt (copied next to them)
    dm = ImageTextDataModule(val=str(out / "validation"), tokenizer=CLIPTokenizer(8), image_size=8,
                             image_mean=(0.5,) * 3, image_std=(0.5,) * 3, batch_size=12)
    dm.setup("validate")
    flags = [(label, flag) for b in dm.val_dataloader() for label, flag in zip(b["label"], b["heldout"])]
    assert len(flags) == 36 and sum(flag for _, flag in flags) == 6
    assert all(flag == (label in S.HELD_OUT_CLASSNAMES) for label, flag in flags)


def test_rows_without_caption_or_image_are_skipped_and_counted(shapes_root, tmp_path):
    rows = [json.loads(line) for line in (shapes_root / "train" / "metadata.jsonl").open()]
    rows[1]["caption"] = ""
    rows[2]["file_name"] = "missing.png"
    rows[3].pop("caption")
    table = tmp_path / "rows.jsonl"
    table.write_text("".join(json.dumps({**r, "file_name": str(shapes_root / "train" / r["file_name"])}) + "\n"
                             for r in rows))
    report = write_shards(table, tmp_path / "out", shard_size=100)
    assert report.written["train"] == 37
    assert dict(report.skipped) == {"missing caption": 2, "missing image": 1}
    assert "skipped 2 (missing caption), 1 (missing image)" in report.summary()


def test_streaming_shards_with_bad_samples(shapes_root, tmp_path):
    """A shard sample with no caption, no image, or a broken image is dropped (and counted); batches stay full."""
    out = tmp_path / "shards"
    write_shards(shapes_root / "train", out, shard_size=10)
    broken = out / "shard-000000.tar"
    with tarfile.open(broken) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(broken, "w") as tar:
        for member, data in members:
            if member.name in ("00000001.txt", "00000002.png"):
                continue  # sample 1 loses its caption, sample 2 its image
            if member.name == "00000003.png":
                data = data[:40]  # truncated image
            member.size = len(data)
            tar.addfile(member, __import__("io").BytesIO(data))
    dm = ImageTextDataModule(train=str(out), tokenizer=CLIPTokenizer(8), image_size=8, image_mean=(0.5,) * 3,
                             image_std=(0.5,) * 3, batch_size=4)
    dm.setup("fit")
    seen = []
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        assert len(batch["path"]) == 4
        seen += batch["path"]
    assert dm.skipped["train"] == 3 and len(seen) == 36
    assert not any(p.endswith(("00000001.png", "00000002.png", "00000003.png")) for p in seen)


def test_two_rank_ddp_sees_every_sample_exactly_once_per_epoch(shapes_root, tmp_path):
    shards = tmp_path / "shards"
    write_shards(shapes_root / "train", shards, shard_size=5)  # 8 shards: 4 per rank, 2 per dataloader worker
    script = Path(__file__).with_name("ddp_data_shards.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    run_job([[sys.executable, str(script), str(shards), str(tmp_path), "2", "5", "2"]], env=env)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = {f"{shards / f'shard-{i // 5:06d}.tar'}:{i:08d}.png" for i in range(40)}
    for epoch in ("0", "1"):
        seen = ranks[0][epoch] + ranks[1][epoch]
        assert len(seen) == 40 and set(seen) == expected  # every sample, once, across the job
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 20


def test_uneven_streams_stop_every_rank_at_the_same_batch(tmp_path):
    from ddp_data_shards import _Uneven, equal_batches_worker  # a light module: spawned processes import it

    mp.spawn(equal_batches_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    # Rank 0 has 5 batches, rank 1 has 4 (the last one partial): both stop after 4, nobody hangs.
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)] == [[4, 4], [4, 4]]
    assert len(list(EqualBatchesDataLoader(_Uneven(7), batch_size=2))) == 4  # no process group: plain loader
