"""Run by tests/test_data_shards.py in a subprocess: 2 CPU processes (Lightning DDP, gloo) train a stand-in task
over streaming webdataset shards; each rank writes the sample paths it saw per epoch. (Under pytest, the plain
ddp strategy would relaunch pytest.)

Usage: python tests/ddp_data_shards.py SHARDS_DIR OUT_DIR NUM_WORKERS BATCH_SIZE EPOCHS
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# Lightning is imported only by main(): test_data_shards.py also spawns equal_batches_worker from this module,
# and every spawned process imports it.


def equal_batches_worker(rank: int, store: str, out: str) -> None:
    """One rank of the uneven-stream check: rank 0 streams 10 items, rank 1 7, in batches of 2."""
    from vlm.data.shards import EqualBatchesDataLoader

    # A file store (no port to race for); a bounded wait, so that a rank whose peer died fails instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(minutes=5))
    loader = EqualBatchesDataLoader(_Uneven(10 if rank == 0 else 7), batch_size=2)
    counts = [len(list(loader)) for _ in range(2)]  # twice: the agreement works epoch after epoch
    Path(out, f"{rank}.json").write_text(json.dumps(counts))
    dist.destroy_process_group()


class _Uneven(torch.utils.data.IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        yield from range(self.n)


def main(shards: str, out: str, num_workers: int, batch_size: int, epochs: int) -> None:
    import lightning.pytorch as pl

    from vlm.data.datamodules import ImageTextDataModule
    from vlm.data.tokenizer import CLIPTokenizer

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, list[str]] = {}

        def training_step(self, batch, batch_idx):
            # The contrastive loss gathers features from every rank: this needs the same batch shape everywhere.
            gathered = self.all_gather(batch["image"].mean(dim=(1, 2, 3)))
            self.seen.setdefault(self.current_epoch, []).extend(batch["path"])
            return (self.weight * gathered.mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    task = Recorder()
    dm = ImageTextDataModule(train=shards, batch_size=batch_size, num_workers=num_workers, tokenizer=CLIPTokenizer(8),
                             image_size=8, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out)
    trainer.fit(task, datamodule=dm)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({str(k): v for k, v in task.seen.items()}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
