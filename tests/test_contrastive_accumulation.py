"""Contrastive gradient accumulation (ContrastiveTask(accumulate_micro_batches=k), GradCache): the gradient of every
parameter equals the whole batch's (CLIP and SigLIP losses, with drop path and patch dropout replayed), a real fit
keeps Lightning's clipping, schedule, NaN guard and temperature clamp, the activations saved for backward shrink
to about one micro-batch's, and under 2-process DDP the gradients equal one process on the whole batch.

The gradient comparisons run in float64 (Trainer(precision="64-true") in the fits): the accumulated and the whole
batch sums are taken in another order, and in float32 that rounding alone reaches the tolerance on some CPUs' BLAS
kernels, while in float64 it is ~1e-12 of each gradient and any real error (a lost micro-batch, a missed loss scale)
is still orders of magnitude above the tolerance.

Also a script: ``python tests/test_contrastive_accumulation.py OUT`` runs one accumulated DDP step (see the test).
"""

from __future__ import annotations

import math
import sys
import warnings

import lightning as L
import pytest
import torch
from conftest import build_trainable, run_job, tiny_clip_config
from ddp_contrastive import Pairs, SaveGrads, _siglip_config, make_batch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from resume_helpers import subprocess_env

from vlm.callbacks import NonFiniteGuard
from vlm.formats import build_task

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def _task(k: int, loss: str = "clip", dtype: torch.dtype = torch.float64, **vision):
    """The tiny CLIP (SigLIP: with a logit bias), the same weights for every ``k``, in training mode."""
    cfg = _siglip_config() if loss == "siglip" else tiny_clip_config(warmup_steps=0)
    cfg["init_args"]["accumulate_micro_batches"] = k
    cfg["init_args"]["model"]["init_args"]["vision"]["init_args"].update(vision)
    torch.manual_seed(0)
    return build_task(cfg).train().to(dtype)


def _grads(task) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in task.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Equal up to rounding: sums are taken in another order, so ``atol`` is relative to each gradient's scale."""
    assert set(got) == set(want)
    for name, g in want.items():
        scaled_atol = atol * max(g.abs().max().item(), 1.0)
        torch.testing.assert_close(got[name], g, atol=scaled_atol, rtol=rtol, msg=f"gradient of {name}")


def _step(task, images, text) -> torch.Tensor:
    """One training step's loss and backward, as Lightning runs them."""
    images = images.to(next(task.parameters()).dtype)
    loss = task.training_step({"image": images, "text": text}, 0)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_gradient_equals_the_whole_batch_gradient(loss, k):
    images, text = make_batch(8)
    ref = _task(1, loss)
    ref_loss = _step(ref, images, text)
    task = _task(k, loss)
    torch.testing.assert_close(_step(task, images, text), ref_loss)  # the returned value is the whole batch's loss
    _assert_same_grads(_grads(task), _grads(ref))
    assert task.model.logit_scale.grad is not None and task.model.logit_scale.grad.abs() > 0


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_random_layers_are_replayed_exactly(loss):
    """With drop path and patch dropout the reference draws the same masks: each micro-batch encoded with a graph, in
    order, then one loss over all of them. Re-encoding without the saved random state would draw other masks."""
    k, stochastic = 4, dict(drop_path=0.5, patch_dropout=0.5)
    images, text = make_batch(8)
    ref = _task(1, loss, **stochastic)
    images = images.double()
    torch.manual_seed(1)
    features = [ref.model(i, t) for i, t in zip(images.chunk(k), text.chunk(k))]
    ref_loss = ref.features_loss(torch.cat([f[0] for f in features]), torch.cat([f[1] for f in features]))
    ref_loss.backward()
    ref_next = torch.rand(3)

    task = _task(k, loss, **stochastic)
    torch.manual_seed(1)
    torch.testing.assert_close(_step(task, images, text), ref_loss.detach())
    _assert_same_grads(_grads(task), _grads(ref))
    assert torch.equal(torch.rand(3), ref_next)  # and the random stream goes on as if each was encoded once

    eval_features = ref.eval().model(images[:2], text[:2])[0]
    assert not torch.allclose(features[0][0], eval_features, atol=1e-3)  # the masks were really random


def test_batch_size_not_divisible_is_a_clear_error():
    images, text = make_batch(8)
    with pytest.raises(ValueError, match=r"batch size 8 is not divisible by accumulate_micro_batches=3"):
        _task(3).training_step({"image": images, "text": text}, 0)
    with pytest.raises(ValueError, match="accumulate_micro_batches must be >= 1"):
        _task(0)


# ------------------------------------------------------------------------------------------------ a real fit
class PoisonStep(Callback):
    """A NaN pixel in the batch of one step: its loss and gradients turn NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["image"][0, 0, 0, 0] = float("nan")


class StepGrads(Callback):
    """The gradients every optimizer step gets (before clipping)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _fit(tmp_path, k: int, callbacks=(), max_steps: int = 4, precision="64-true", **trainer_args):
    cfg = tiny_clip_config(warmup_steps=2, accumulate_micro_batches=k)
    cfg["init_args"]["model"]["init_args"]["init_logit_scale"] = 5.0  # above the clamp ln(100)
    torch.manual_seed(0)
    task = build_trainable(cfg)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=list(callbacks), precision=precision, **trainer_args)
    trainer.fit(task, torch.utils.data.DataLoader(Pairs(), batch_size=4, drop_last=True))
    return task, trainer


def test_fit_with_accumulation_keeps_lightnings_step(tmp_path):
    guard, steps = NonFiniteGuard("skip"), StepGrads()
    task, trainer = _fit(tmp_path, 2, [steps, guard, PoisonStep(1)], gradient_clip_val=1.0)
    ref = _task(1)
    ref.model.logit_scale.data.fill_(5.0)
    _step(ref, *(x[:4] for x in make_batch(8)))  # the first batch, whole
    _assert_same_grads(steps.grads[0], _grads(ref))

    assert trainer.global_step == 4 and guard.skipped == 1  # the NaN step was skipped, the others taken
    assert all(torch.isfinite(v).all() for v in task.state_dict().values())
    assert task.model.logit_scale.item() <= math.log(100) + 1e-6  # clamped after the optimizer steps
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == trainer.global_step  # one schedule step per optimizer step
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())


def _fp16_on_cpu() -> MixedPrecision:
    # Trainer(precision="16-mixed") becomes bf16 on the CPU; this plugin keeps fp16 and its loss scaling. The scale
    # is small so that this tiny model's fp16 gradients do not overflow (which would skip the step).
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))


@pytest.mark.parametrize("case", ["accumulate_grad_batches", "fp16"])
def test_fit_gradients_equal_without_micro_batches(tmp_path, case):
    """Lightning divides the loss by Trainer(accumulate_grad_batches) and multiplies it by the fp16 loss scale before
    its backward: the micro-batches' shares, backpropagated earlier, must be scaled alike."""
    runs = []
    for k in (1, 2):
        steps = StepGrads()
        if case == "accumulate_grad_batches":
            args = dict(accumulate_grad_batches=2)
        else:  # float32 weights under fp16 autocast
            args = dict(plugins=[_fp16_on_cpu()], precision=None)
        _fit(tmp_path, k, [steps], max_steps=2, **args)
        runs.append(steps.grads)
    assert len(runs[0]) == len(runs[1]) == 2
    if case == "fp16":  # fp16 rounding: about 1% here (then the weights drift apart); a missed factor 16 fails
        _assert_same_grads(runs[1][0], runs[0][0], rtol=0.05, atol=0.02)
    else:
        _assert_same_grads(runs[1][0], runs[0][0])
        # The second step shows that the gradients were zeroed in between (else they would be about twice as
        # large). Only up to 1%: AdamW turns the first step's rounding differences in near-zero gradients into
        # weight differences of up to 2 * lr, which the second step's gradients inherit.
        _assert_same_grads(runs[1][1], runs[0][1], rtol=0.01, atol=1e-3)


# ------------------------------------------------------------------------------------------------- memory
class SavedBytes:
    """Bytes of the tensors saved for backward that are alive (parameters left out), and their peak.

    Each saved tensor is packed in a :class:`_Saved` that counts itself out when autograd drops it, so the figure
    follows the graphs being built and freed, deterministically (no allocator statistics, no timing)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        return t if t.untyped_storage().data_ptr() in self.params else _Saved(t, self)

    def unpack(self, x):
        return x.t if isinstance(x, _Saved) else x


class _Saved:
    def __init__(self, t: torch.Tensor, meter: SavedBytes) -> None:
        self.t, self.meter, self.nbytes = t, meter, t.nelement() * t.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


def _peak_saved_bytes(k: int) -> int:
    task = _task(k)
    images, text = make_batch(32)
    meter = SavedBytes(task)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        _step(task, images, text)
    assert meter.live == 0  # every graph was freed
    return meter.peak


def test_activation_memory_is_about_one_micro_batch():
    full, accumulated = _peak_saved_bytes(1), _peak_saved_bytes(4)
    assert accumulated < 0.4 * full, (accumulated, full)


# ---------------------------------------------------------------------------------------------------- DDP
def test_ddp_accumulated_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    # Lightning starts the second rank itself, on MASTER_PORT: a fresh port each attempt, the job bounded in time
    run_job(lambda port: [([sys.executable, __file__, str(tmp_path)],
                           {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})])
    ranks = [torch.load(tmp_path / f"grads_rank{r}.pt") for r in (0, 1)]
    ref = _task(1)
    _step(ref, *make_batch(8))
    for name in ranks[0]:
        torch.testing.assert_close(ranks[0][name], ranks[1][name])  # both ranks apply the same gradient
    _assert_same_grads(ranks[0], _grads(ref), rtol=1e-4)


def _ddp_main(out: str) -> None:
    """One step of 2 CPU processes, 4 samples each in 2 micro-batches of 2; each rank saves its gradients."""
    warnings.filterwarnings("ignore")
    task = _task(2)
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, precision="64-true",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SaveGrads(out)])
    trainer.fit(task, torch.utils.data.DataLoader(Pairs(), batch_size=4))  # Lightning adds a DistributedSampler


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
