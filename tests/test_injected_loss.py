"""The contrastive loss as an object a config names (issue 29): a new loss is one class in vlm/losses.py, chosen by
``loss: {class_path: ...}``; its learnable scalars are saved, train under gradient accumulation exactly as without
it, and take no weight decay; ``val/loss`` is the training loss; a file may name only vlm's losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import build_trainable, tiny_clip_config
from ddp_contrastive import _siglip_config, make_batch

import vlm.losses
from vlm.formats import CheckpointError, build_task
from vlm.losses import ClipLoss, ContrastiveLoss, SigLipLoss, clip_loss, siglip_loss

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


class MarginLoss(ContrastiveLoss):
    """A toy loss with a learnable scalar: CLIP's InfoNCE with a learnable additive margin on the matching pairs."""

    def __init__(self, init_margin: float = 0.5) -> None:
        super().__init__()
        self.margin = torch.nn.Parameter(torch.tensor(float(init_margin)))

    def forward(self, image, text, all_image, all_text, logit_scale, logit_bias, offset, same=None):
        scale = logit_scale.exp()
        labels = torch.arange(image.shape[0]) + offset
        on_pair = F.one_hot(labels, all_text.shape[0]).to(image.dtype)
        per_image = scale * image @ all_text.T - self.margin * on_pair
        per_text = scale * text @ all_image.T - self.margin * on_pair
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


@pytest.fixture
def margin_loss(monkeypatch):
    """The toy loss added to vlm/losses.py, as a user adding a loss would: the one file that changes."""
    monkeypatch.setattr(vlm.losses, "MarginLoss", MarginLoss, raising=False)
    MarginLoss.__module__ = "vlm.losses"
    yield "vlm.losses.MarginLoss"
    MarginLoss.__module__ = __name__


def _config(loss, k: int = 1) -> dict:
    cfg = tiny_clip_config(warmup_steps=0)
    cfg["init_args"]["loss"] = loss
    cfg["init_args"]["accumulate_micro_batches"] = k
    return cfg


def _step(task, images, text):
    loss = task.training_step({"image": images.to(torch.float64), "text": text}, 0)
    loss.backward()
    return loss.detach()


def test_the_names_and_the_classes_give_the_same_loss():
    images, text = make_batch(8)
    for name, cls in (("clip", ClipLoss), ("siglip", SigLipLoss)):
        base = _siglip_config() if name == "siglip" else tiny_clip_config(warmup_steps=0)
        losses = []
        for loss in (name, {"class_path": f"vlm.losses.{cls.__name__}"}):
            cfg = copy.deepcopy(base)
            cfg["init_args"]["loss"] = loss
            torch.manual_seed(0)
            task = build_trainable(cfg).train()
            assert type(task.loss) is cls
            torch.manual_seed(1)
            losses.append(task.compute_loss(images, text))
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    # against the functions, by hand
    torch.manual_seed(0)
    task = build_trainable(_config("clip")).eval()
    i, t = task.encode(images, text)
    torch.testing.assert_close(task.compute_loss(images, text), clip_loss(i, t, i, t, task.model.logit_scale, 0))


def test_a_new_loss_is_one_class_named_by_a_config_and_its_scalar_trains_under_accumulation(margin_loss):
    images, text = make_batch(8)
    grads, values = [], []
    for k in (1, 4):
        torch.manual_seed(0)
        task = build_trainable(_config({"class_path": margin_loss, "init_args": {"init_margin": 0.5}}, k))
        task = task.train().to(torch.float64)
        assert isinstance(task.loss, MarginLoss) and "loss.margin" in task.state_dict()
        values.append(_step(task, images, text))
        grads.append({n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None})
    torch.testing.assert_close(values[1], values[0])
    # the loss's own scalar gets its gradient with micro-batches exactly as without (float64: only summation order)
    assert grads[0]["loss.margin"].abs() > 0
    assert set(grads[0]) == set(grads[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-9, atol=1e-12 * max(g.abs().max().item(), 1.0),
                                   msg=name)
    # and no weight decay on it, like the temperature
    opt = task.configure_optimizers()["optimizer"]
    decay_of = {id(p): group["weight_decay"] for group in opt.param_groups for p in group["params"]}
    assert decay_of[id(task.loss.margin)] == 0.0


def test_the_loss_and_its_scalar_are_saved_and_load_back(margin_loss, tmp_path):
    torch.manual_seed(0)
    config = _config({"class_path": margin_loss, "init_args": {"init_margin": 0.25}})
    task = build_trainable(config)
    with torch.no_grad():
        task.loss.margin.fill_(0.75)
    path = tmp_path / "margin.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "inference": task.inference_settings()}, path)
    from vlm.formats.load import load_task

    loaded = load_task(path)
    assert isinstance(loaded.loss, MarginLoss) and loaded.loss.margin.item() == 0.75


def test_validation_loss_is_the_training_loss():
    images, text = make_batch(8)
    torch.manual_seed(0)
    task = build_task(_siglip_config()).eval()
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, value)
    task._val_outputs = {"image": [], "text": [], "target": []}
    task._classifier = None
    with torch.no_grad():
        task.validation_step({"image": images, "text": text}, 0)
        i, t = task.encode(images, text)
        want = siglip_loss(i, t, task.model.logit_scale, task.model.logit_bias, 0)
    torch.testing.assert_close(logged["val/loss"], want)


@pytest.mark.parametrize("class_path", ["vlm.losses.clip_loss", "vlm.losses.F", "vlm.losses.nn.Module",
                                        "os.system", "vlm.losses._private", "vlm.losses.Nonexistent"])
def test_a_file_may_name_only_a_contrastive_loss_of_vlm_losses(class_path):
    config = _config({"class_path": class_path})
    with pytest.raises(CheckpointError, match="refused config.init_args.loss.class_path"):
        build_task(config)


def test_a_loss_that_needs_a_bias_is_refused_without_one():
    with pytest.raises(ValueError, match="SigLipLoss needs a model built with init_logit_bias"):
        build_trainable(_config({"class_path": "vlm.losses.SigLipLoss"}))
    with pytest.raises(ValueError, match="loss must be one of"):
        build_trainable(_config("softmax"))
