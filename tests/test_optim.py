"""Injected optimizers and schedules (``optimizer`` / ``lr_scheduler``): training is bit for bit what the tasks' own
AdamW + warm-up/cosine code gave, with the shipped configs' values and with each task's defaults; the parameter
groups and the schedule do what they say."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import assert_fp32_close, build_trainable, tiny_clip_config
from ddp_contrastive import make_batch
from lightning.pytorch.callbacks import Callback
from resume_helpers import one_thread

from vlm.tasks.optim import AdamW, WarmupCosine, param_groups

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


# --------------------------------------------------------------------------- the tasks' former optimizer code
def _former_optimizer(task, lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio) -> dict:
    """What ``configure_optimizers`` returned before the optimizer was injected (vlm/tasks/optim.py's
    ``build_optimizer``, verbatim but for names): AdamW over decayed / non-decayed groups, fused on the CPU, and a
    LambdaLR with linear warm-up then cosine decay over ``trainer.estimated_stepping_batches``."""
    decay, no_decay = [], []
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and "embed" not in name and "positional" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)
    total = task.trainer.estimated_stepping_batches if task._trainer is not None else 1
    total = int(total) if math.isfinite(total) else max(warmup_steps * 10, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# ------------------------------------------------------------------------------------------------- the tasks
TINY_LM = {"class_path": "vlm.tasks.language.LanguageModelTask", "init_args": {
    "model": {"class_path": "vlm.models.decoder.DecoderLM",
              "init_args": {"context_length": 24, "width": 32, "depth": 2, "num_heads": 2}}}}
TINY_FLAMINGO = {"class_path": "vlm.tasks.captioning.FlamingoTask", "init_args": {
    "model": {"class_path": "vlm.models.flamingo.Flamingo", "init_args": {
        "vision": {"class_path": "vlm.models.vit.VisionTransformer",
                   "init_args": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "num_heads": 2}},
        "decoder": {"class_path": "vlm.models.decoder.DecoderLM",
                    "init_args": {"context_length": 24, "width": 16, "depth": 2, "num_heads": 2}},
        "num_latents": 4, "resampler_depth": 1, "resampler_heads": 2, "cross_attn_heads": 2}}}}
CAPTIONS = ["a small red circle", "a large blue star above a small red cross", "a green square", "a red star"]


class _Batches(torch.utils.data.Dataset):
    """Four samples of the task's kind of batch (images and token ids, texts, or both)."""

    def __init__(self, kind: str, tokenizer) -> None:
        images, text = make_batch(4)
        self.items = [{"image": images[i], "text": text[i]} for i in range(4)]
        if kind != "clip":
            enc = tokenizer.encode_batch(CAPTIONS)
            self.items = [{"input_ids": enc["input_ids"][i], "labels": enc["labels"][i], "caption": CAPTIONS[i],
                           **({"image": images[i]} if kind == "flamingo" else {})} for i in range(4)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class _Record(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append([g["lr"] for g in optimizer.param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def _fit(config: dict, kind: str, tmp_path: Path, former: dict | None = None):
    """Trains the task of ``config`` for a few steps (with the former optimizer code and ``former``'s values, if
    given); returns the task, the recorded losses and learning rates and the optimizer's final state."""
    L.seed_everything(0)
    task = build_trainable(copy.deepcopy(config))
    if former is not None:
        task.configure_optimizers = lambda: _former_optimizer(task, **former)
    record = _Record()
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[record])
    trainer.fit(task, torch.utils.data.DataLoader(_Batches(kind, task.tokenizer), batch_size=2))
    return task, record, trainer.optimizers[0].state_dict()


def _injected(config: dict, lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio) -> dict:
    cfg = copy.deepcopy(config)
    cfg["init_args"]["optimizer"] = {"class_path": "vlm.tasks.optim.AdamW", "init_args": {
        "lr": lr, "weight_decay": weight_decay, "betas": list(betas), "eps": eps}}
    cfg["init_args"]["lr_scheduler"] = {"class_path": "vlm.tasks.optim.WarmupCosine", "init_args": {
        "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio}}
    return cfg


def _clip_shapes_config() -> dict:
    """The tiny CLIP with configs/clip/shapes.yaml's optimizer and schedule, as that file states them."""
    shipped = yaml.safe_load((ROOT / "configs/clip/shapes.yaml").read_text())["model"]["init_args"]
    cfg = tiny_clip_config()
    cfg["init_args"].update(optimizer=shipped["optimizer"], lr_scheduler=shipped["lr_scheduler"])
    return cfg


def _without_optimizer(config: dict) -> dict:
    cfg = copy.deepcopy(config)
    cfg["init_args"].pop("optimizer", None)
    cfg["init_args"].pop("lr_scheduler", None)
    return cfg


# name: (new-form config, kind of task, the former arguments' values: lr, weight decay, betas, eps, warm-up, min ratio)
CASES = {
    # a shipped config's values; 8 steps stay inside its 100-step warm-up
    "clip, configs/clip/shapes.yaml": (_clip_shapes_config(), "clip", (2e-3, 0.05, (0.9, 0.98), 1e-6, 100, 0.0)),
    # warm-up, then the cosine decay to its floor at the last step
    "clip, warm-up 3 and cosine": (_injected(tiny_clip_config(), 1e-3, 0.1, (0.9, 0.98), 1e-6, 3, 0.1), "clip",
                                   (1e-3, 0.1, (0.9, 0.98), 1e-6, 3, 0.1)),
    # nothing injected: each task's defaults are its former defaults
    "clip defaults": (_without_optimizer(tiny_clip_config()), "clip", (5e-4, 0.1, (0.9, 0.98), 1e-6, 100, 0.0)),
    "language model defaults": (TINY_LM, "lm", (1e-3, 0.1, (0.9, 0.95), 1e-8, 100, 0.1)),
    "flamingo defaults": (TINY_FLAMINGO, "flamingo", (1e-3, 0.05, (0.9, 0.95), 1e-8, 100, 0.1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_injected_optimizer_trains_exactly_as_the_former_code(case, tmp_path):
    config, kind, values = CASES[case]
    former = dict(zip(("lr", "weight_decay", "betas", "eps", "warmup_steps", "min_lr_ratio"), values))
    new_task, new, new_state = _fit(config, kind, tmp_path / "new", None)
    old_task, old, old_state = _fit(config, kind, tmp_path / "old", former)
    assert len(new.losses) == STEPS and new.losses == old.losses  # exact float equality, step by step
    assert new.lrs == old.lrs
    assert new.lrs[0][0] == pytest.approx(values[0] / values[4]) and new.lrs[0][1] == new.lrs[0][0]
    if case == "clip, warm-up 3 and cosine":
        assert new.lrs[-1][0] < new.lrs[3][0] and new.lrs[-1][0] >= values[0] * values[5]  # decayed
    for name, value in old_task.state_dict().items():
        assert torch.equal(new_task.state_dict()[name], value), name
    assert new_state["param_groups"] == old_state["param_groups"]  # lr, betas, eps, weight decay, fused...
    for index, state in old_state["state"].items():
        for key, value in state.items():
            assert torch.equal(new_state["state"][index][key], value), (index, key)


def test_param_groups_decay_only_matrices():
    task = build_trainable(tiny_clip_config())
    optimizer = task.configure_optimizers()["optimizer"]
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in task.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert {"model.vision.blocks.0.attn.qkv.weight", "model.text_proj.weight"} <= decayed_names
    plain_names = {names[id(p)] for p in plain["params"]}
    assert {"model.logit_scale", "model.vision.blocks.0.norm1.weight", "model.vision.blocks.0.attn.qkv.bias",
            "model.text.pos_embed"} <= plain_names
    assert not any("embed" in name for name in decayed_names)
    assert optimizer.defaults["fused"]  # on the CPU: the fused kernel
    assert param_groups(task, 0.3)[0]["weight_decay"] == 0.3


def test_warmup_cosine_schedule_and_its_default_length():
    p = torch.nn.Parameter(torch.zeros(2))
    schedule = WarmupCosine(AdamW([p], lr=1.0), warmup_steps=2, min_lr_ratio=0.25, total_steps=6)
    lrs = []
    for _ in range(8):
        lrs.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-2:] == [0.25, 0.25]  # warm-up, peak, then the floor from step 6
    assert lrs[3] == pytest.approx(0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi / 4)))
    task = build_trainable(tiny_clip_config(warmup_steps=5))  # no trainer: the former code's one-step run
    assert task.configure_optimizers()["lr_scheduler"]["scheduler"].total_steps == 1


@pytest.mark.parametrize("config", ["configs/clip/vit_b16.yaml", "configs/flamingo/hf_lm.yaml"])
def test_gpu_configs_clip_gradients_under_mixed_precision_with_the_fused_optimizer(config):
    """The GPU configs' bf16-mixed with gradient clipping, on the fused AdamW: Lightning refuses to clip for an
    optimizer that unscales inside its step, so vlm's AdamW must not claim to."""
    trainer_cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / config).read_text())["trainer"]
    assert trainer_cfg["precision"] == "bf16-mixed" and trainer_cfg["gradient_clip_val"] > 0
    task = build_trainable(tiny_clip_config(warmup_steps=0))
    images, text = make_batch(8)
    loader = torch.utils.data.DataLoader([{"image": i, "text": t} for i, t in zip(images, text)], batch_size=4)
    before = copy.deepcopy(task.state_dict())
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=trainer_cfg["precision"], max_steps=2,
                        gradient_clip_val=trainer_cfg["gradient_clip_val"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with one_thread():
        trainer.fit(task, train_dataloaders=loader)
    assert trainer.optimizers[0].defaults["fused"] and trainer.global_step == 2
    assert not torch.equal(before["model.text_proj.weight"], task.state_dict()["model.text_proj.weight"])


def test_fused_adamw_under_an_fp16_grad_scaler_steps_like_the_per_tensor_loop():
    """With ``_step_supports_amp_scaling`` off, the GradScaler unscales before clipping and the step: the fused
    update then equals the per-tensor loop's under the same scaler."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 4)
    # the per-tensor loop in float64 too: the reference both float32 updates are measured against
    models = {"fused": copy.deepcopy(ref), "loop": copy.deepcopy(ref), "exact": copy.deepcopy(ref).double()}
    optimizers = {"fused": AdamW(models["fused"].parameters(), lr=0.1),
                  "loop": torch.optim.AdamW(models["loop"].parameters(), lr=0.1, weight_decay=0.01, foreach=False),
                  "exact": torch.optim.AdamW(models["exact"].parameters(), lr=0.1, weight_decay=0.01, foreach=False)}
    assert optimizers["fused"].defaults["fused"]
    x = torch.randn(16, 8)
    for name, model in models.items():
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for _ in range(3):
            optimizers[name].zero_grad()
            scaler.scale(model(x.to(model.weight.dtype)).pow(2).mean()).backward()
            scaler.unscale_(optimizers[name])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            scaler.step(optimizers[name])
            scaler.update()
    for a, b, e in zip(models["fused"].parameters(), models["loop"].parameters(), models["exact"].parameters()):
        assert_fp32_close(a, b, e)
    assert not torch.equal(models["fused"].weight, ref.weight)
