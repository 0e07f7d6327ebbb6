"""Run by tests/test_contrastive.py in a subprocess: one contrastive step under Lightning DDP (2 CPU processes,
gloo); each rank saves the gradients it would apply. (Under pytest, the plain ddp strategy would relaunch pytest.)"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import tiny_clip_config  # noqa: E402

from vlm.formats import build_task  # noqa: E402


def make_batch(n: int = 8):
    """The same deterministic batch in every process and in the test."""
    g = torch.Generator().manual_seed(123)
    images = torch.randn(n, 3, 16, 16, generator=g)
    text = torch.randint(1, 400, (n, 16), generator=g)
    text[:, 0] = 49406
    text[torch.arange(n), torch.randint(3, 15, (n,), generator=g)] = 49407
    return images, text


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.images, self.text = make_batch()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "text": self.text[i]}


class SaveGrads(Callback):
    def __init__(self, out: str):
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        torch.save(grads, f"{self.out}/grads_rank{trainer.global_rank}.pt")


def main(out: str, loss: str) -> None:
    torch.manual_seed(0)
    task = build_task(_siglip_config() if loss == "siglip" else tiny_clip_config(warmup_steps=0))
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveGrads(out)],
    )
    loader = torch.utils.data.DataLoader(Pairs(), batch_size=4)  # Lightning adds a DistributedSampler
    trainer.fit(task, loader)


def _siglip_config():
    cfg = tiny_clip_config(loss="siglip", warmup_steps=0)
    cfg["init_args"]["model"]["init_args"].update(init_logit_bias=-10.0, init_logit_scale=2.3)
    return cfg


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
