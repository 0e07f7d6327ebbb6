"""Run by tests/test_fsdp.py in subprocesses: a few training steps of a tiny CLIP or
Flamingo task on a fixed in-memory dataset, under one process, DDP or FSDP2 (``vlm.tasks.sharding.FSDP2Strategy``)
on CPUs (gloo), on one or several simulated nodes. Each rank writes the loss of every step it trained
(``losses_rank{R}.json``) and samples, what its model and optimizer hold (``run_rank{R}.json``), rank 0 the full
trained weights (``weights.pt``).

    python tests/fsdp_train.py OUT --task clip|flamingo --strategy single|ddp|fsdp [--devices N] [--num-nodes N]
        [--max-steps N] [--ckpt-every N] [--resume CKPT] [--checkpointing none|frozen|all] [--dtype float64]

``--dtype float64`` trains in float64 (the task's parameters and the images), where two orders of summation agree
to about 1e-16 relative, so comparing the runs tests the split of the batch and not float32 rounding.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_FLAMINGO, build_trainable, tiny_clip_config  # noqa: E402

GLOBAL_BATCH, SAMPLES = 8, 24  # 3 steps per epoch
WORDS = (["red", "blue", "green"], ["circle", "square", "star"])  # one GPT-2 token each: equal caption lengths


def flamingo_config() -> dict:
    cfg = copy.deepcopy(TINY_FLAMINGO)
    cfg["init_args"]["optimizer"] = {"class_path": "vlm.tasks.optim.AdamW",
                                     "init_args": {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]}}
    cfg["init_args"]["lr_scheduler"] = {"class_path": "vlm.tasks.optim.WarmupCosine",
                                        "init_args": {"warmup_steps": 0, "min_lr_ratio": 0.1}}
    return cfg


class Samples(torch.utils.data.Dataset):
    """The same samples in every process: images from a fixed generator, captions of equal token counts (so the mean
    of the ranks' per-token losses is the whole batch's)."""

    def __init__(self, task, kind: str, dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(123)
        self.images = torch.randn(SAMPLES, 3, 16, 16, generator=g).to(dtype)
        if kind == "flamingo":
            colours, shapes = WORDS
            self.captions = [f"a {colours[i % 3]} {shapes[(i // 3) % 3]}" for i in range(SAMPLES)]
            self.encoded = task.tokenizer.encode_batch(self.captions)
            counts = (self.encoded["labels"] != -100).sum(1)
            assert (counts == counts[0]).all(), counts
        else:
            self.text = torch.randint(1, 400, (SAMPLES, 16), generator=g)
            self.text[:, 0] = 49406
            self.text[torch.arange(SAMPLES), torch.randint(3, 15, (SAMPLES,), generator=g)] = 49407

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        if hasattr(self, "captions"):
            return {"image": self.images[i], "caption": self.captions[i], "input_ids": self.encoded["input_ids"][i],
                    "labels": self.encoded["labels"][i], "index": i}
        return {"image": self.images[i], "text": self.text[i], "index": i}


class Strided(torch.utils.data.Sampler):
    """Rank r of w reads samples r, r + w, r + 2w, ... in order: each step's global batch is the single process's
    (Lightning's own distributed sampler would shuffle)."""

    def __init__(self, world: int):
        self.world = world

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter(range(rank, SAMPLES, self.world))

    def __len__(self):
        return SAMPLES // self.world


class Record(Callback):
    def __init__(self, out: Path):
        self.out, self.losses, self.samples = out, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.samples[trainer.global_step] = batch["index"].tolist()
        (self.out / f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))
        (self.out / f"samples_rank{trainer.global_rank}.json").write_text(json.dumps(self.samples))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--task", choices=["clip", "flamingo"], required=True)
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp"], required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume")
    p.add_argument("--checkpointing", default="none")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    task = build_trainable(tiny_clip_config(warmup_steps=0) if args.task == "clip" else flamingo_config()).to(dtype)
    world = args.devices * args.num_nodes
    loader = torch.utils.data.DataLoader(Samples(task, args.task, dtype), batch_size=GLOBAL_BATCH // world,
                                         sampler=Strided(world))
    if args.strategy == "fsdp":
        from vlm.tasks.sharding import FSDP2Strategy

        strategy = FSDP2Strategy(activation_checkpointing=args.checkpointing)
    else:
        strategy = "ddp" if args.strategy == "ddp" else "auto"
    callbacks: list[Callback] = [Record(args.out)]
    if args.ckpt_every:
        from vlm.callbacks import Checkpoint

        # Every N steps a checkpoint of its own (step=N.ckpt), besides last.ckpt.
        callbacks.append(Checkpoint(dirpath=str(args.out / "checkpoints"), every_n_train_steps=args.ckpt_every,
                                    save_top_k=-1, filename="{step}"))
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy,
                        max_steps=args.max_steps, logger=False, enable_checkpointing=bool(args.ckpt_every),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=1.0, callbacks=callbacks,
                        use_distributed_sampler=False)
    trainer.fit(task, train_dataloaders=loader, ckpt_path=args.resume)

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if args.strategy == "fsdp":
        weights = get_model_state_dict(task, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        weights = {k: v.detach().cpu() for k, v in task.state_dict().items()}
    optimizer = trainer.optimizers[0]
    state = [s for s in optimizer.state.values() if s]
    local = sum(int(v.to_local().numel() if hasattr(v, "to_local") else v.numel())
                for s in state for k, v in s.items() if k == "exp_avg")
    if trainer.global_rank == 0:
        torch.save(weights, args.out / "weights.pt")
    from torch.distributed.fsdp import FSDPModule

    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    (args.out / f"run_rank{trainer.global_rank}.json").write_text(json.dumps({
        "fsdp_units": sorted(type(m).__name__ for m in task.modules() if isinstance(m, FSDPModule)),
        "checkpointed": sorted(type(m._checkpoint_wrapped_module).__name__ for m in task.modules()
                               if hasattr(m, "_checkpoint_wrapped_module")),
        "with_state": len(state),
        "trainable": len(trainable),
        "trainable_elements": sum(p.numel() for p in task.parameters() if p.requires_grad),
        "local_exp_avg_elements": local,
        "params_in_optimizer": sum(len(g["params"]) for g in optimizer.param_groups),
    }))


if __name__ == "__main__":
    main()
