"""The training loader resumes mid-epoch: an interrupted + resumed run trains on exactly the batches of an
uninterrupted one, in the same order (no sample repeated or skipped)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlm.data import shapes as S
from vlm.data.datamodules import ImageTextDataModule
from vlm.data.resumable import EpochSampler
from vlm.data.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    S.generate_shapes(root, train=40, val=36, seed=0, image_size=32, processes=1)
    return root


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, tuple[str, ...]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, tuple(batch["path"])))
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, tmp_path, in_memory, ckpt_path=None, **trainer_args):
    task = Recorder()
    dm = ImageTextDataModule(train=str(root / "train"), batch_size=8, in_memory=in_memory, seed=5,
                             tokenizer=CLIPTokenizer(8), image_size=8, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=0,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)],
                         **trainer_args)
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return task.seen


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("stop_at", [3, 5, 7])  # mid-epoch 0, exactly at the end of epoch 0, mid-epoch 1
def test_resume_continues_the_same_order(shapes_root, tmp_path, stop_at, in_memory):
    full = _fit(shapes_root, tmp_path / "full", in_memory, max_epochs=3)
    assert len(full) == 15 and len({b for _, b in full[:5]}) == 5  # 40 images, 5 batches per epoch
    assert full[0][1] != full[5][1]  # a new order every epoch
    first = _fit(shapes_root, tmp_path / "run", in_memory, max_steps=stop_at)
    rest = _fit(shapes_root, tmp_path / "run", in_memory, ckpt_path=str(tmp_path / "run" / "ckpt" / "last.ckpt"),
                max_epochs=3)
    assert first + rest == full


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(50, seed=1), EpochSampler(50, seed=1)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
