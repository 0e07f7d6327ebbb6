"""Non-finite losses and gradients: NonFiniteGuard skips (and counts) or stops with the step named, and a checkpoint
is never replaced by one holding NaN weights. NaNs are injected through a poisoned batch or a poisoned gradient."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch
from conftest import build_trainable, tiny_clip_config
from ddp_contrastive import Pairs
from lightning.pytorch.callbacks import Callback
from resume_helpers import one_thread

from vlm.callbacks import Checkpoint, NonFiniteGuard
from vlm.reliability import AtomicCheckpointIO, NonFiniteError, non_finite_entries


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


class PoisonBatch(Callback):
    """Puts a NaN pixel into the batch of the given global steps (the loss, then every gradient, turn NaN)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["image"][0, 0, 0, 0] = float("nan")


class PoisonGradient(Callback):
    """Makes one gradient entry infinite after backward, the loss staying finite."""

    def __init__(self, step):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            pl_module.model.text_proj.weight.grad[0, 0] = float("inf")


class Snapshots(Callback):
    """Weights before and after every step."""

    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _fit(tmp_path, callbacks, max_steps=8):
    torch.manual_seed(0)
    task = build_trainable(tiny_clip_config(warmup_steps=0))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    loader = torch.utils.data.DataLoader(Pairs(), batch_size=4)
    trainer.fit(task, loader)
    return task, trainer


def _all_finite(state_dict):
    return not list(non_finite_entries(state_dict))


def test_skip_policy_skips_counts_and_logs_poisoned_steps(tmp_path):
    guard, snaps = NonFiniteGuard("skip"), Snapshots()
    task, trainer = _fit(tmp_path, [PoisonBatch({3, 5}), guard, snaps, Checkpoint(every_n_train_steps=2)])
    assert trainer.global_step == 8 and guard.skipped == 2
    assert trainer.logged_metrics["train/nonfinite_skipped"] == 2
    for step in (3, 5):  # a skipped step leaves every weight bit as it was
        for name, value in snaps.before[step].items():
            assert torch.equal(snaps.after[step][name], value), name
    for step in (2, 4):  # the others do train
        assert any(not torch.equal(snaps.after[step][k], v) for k, v in snaps.before[step].items())
    assert _all_finite(task.state_dict())
    optimizer = trainer.optimizers[0]
    steps = {int(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]}
    assert steps == {6}  # AdamW's moments saw only the 6 good steps
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 8 and _all_finite(saved["state_dict"]) and _all_finite(saved["optimizer_states"])
    assert saved["callbacks"]["NonFiniteGuard"]["skipped"] == 2  # the count survives a resume


def test_non_finite_gradient_with_finite_loss_is_caught(tmp_path):
    guard = NonFiniteGuard("skip")
    task, trainer = _fit(tmp_path, [PoisonGradient(2), guard], max_steps=4)
    assert guard.skipped == 1 and _all_finite(task.state_dict())


def test_stop_policy_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    snaps = Snapshots()
    with pytest.raises(NonFiniteError, match=r"non-finite loss and gradient at global step 5 \(epoch 2\)"):
        _fit(tmp_path, [PoisonBatch({5}), NonFiniteGuard("stop"), snaps, Checkpoint(every_n_train_steps=2)])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and _all_finite(saved["state_dict"])
    for name, value in snaps.after[3].items():  # the weights of the step-4 checkpoint, untouched since
        assert torch.equal(saved["state_dict"][name], value)


def test_consecutive_skips_stop_a_diverged_run(tmp_path):
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        _fit(tmp_path, [PoisonBatch(range(2, 8)), NonFiniteGuard("skip", max_consecutive_skips=3)])


class PoisonWeights(Callback):
    """Writes a NaN straight into a weight after the given step, behind the guard's back."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.vision_proj.weight[0, 0] = float("nan")


def test_checkpoint_is_never_overwritten_with_non_finite_weights(tmp_path, caplog):
    snaps = Snapshots()
    with caplog.at_level(logging.ERROR, logger="vlm.reliability"):
        _fit(tmp_path, [PoisonWeights(3), snaps, Checkpoint(every_n_train_steps=2)], max_steps=6)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and _all_finite(saved["state_dict"])  # the saves at 4 and 6 were refused
    assert "non-finite values in state_dict.model." in caplog.text and "previous checkpoint is kept" in caplog.text


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)

    def crash(obj, f):  # dies half-way through the new file
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_guard_rejects_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        NonFiniteGuard("ignore")


def test_vlm_fit_stop_policy_prints_one_line_and_exits_1(tmp_path, capsys):
    from resume_helpers import clip_task_config, fit_config

    from vlm.__main__ import main
    from vlm.data import shapes as S

    S.generate_shapes(tmp_path / "shapes", train=32, val=36, seed=0, image_size=32, processes=1)
    cfg = fit_config(clip_task_config(), tmp_path / "shapes", tmp_path / "run", max_steps=6, every=2, val_every=100)
    cfg["data"]["init_args"]["source"]["init_args"]["num_train"] = 32
    cfg["trainer"]["callbacks"][1]["init_args"] = {"policy": "stop"}
    cfg["trainer"]["callbacks"].append({"class_path": "resume_helpers.PoisonBatch", "init_args": {"step": 3}})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["fit", "--config", str(tmp_path / "config.json")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlm: error:")]
    assert err == ["vlm: error: non-finite loss and gradient at global step 3 (epoch 0); stopping (NonFiniteGuard "
                   "policy 'stop'). The last checkpoint holds the weights from before it."]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and _all_finite(saved["state_dict"])
