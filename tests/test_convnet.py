"""The convolutional image tower: shapes, its place in CLIP and Flamingo, per-image independence, locking, files."""

from __future__ import annotations

import pytest
import torch

from vlm.models.convnet import ConvNet


def _tower(**kw) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(image_size=32, channels=(8, 16, 16), **kw)


def test_pooled_embedding_is_the_mean_of_the_tokens_before_their_norm():
    tower = _tower().eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = tower.intermediate_tokens(x, 0)
    assert tokens.shape == (3, 16, 16) and tower.grid == 4 and tower.width == 16
    torch.testing.assert_close(tower(x), tokens.mean(dim=1))
    normed = tower.forward_tokens(x)
    expected = torch.nn.functional.layer_norm(tokens, (16,), tower.norm.weight, tower.norm.bias)
    torch.testing.assert_close(normed, expected)
    with pytest.raises(ValueError, match="only the last"):
        tower.intermediate_tokens(x, 1)


def test_group_norm_keeps_each_image_independent_of_its_batch():
    tower = _tower().train()  # in training mode too: no batch statistics
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    tower = tower.double()
    whole = tower(x)
    alone = torch.cat([tower(x[i: i + 1]) for i in range(4)])
    # float64: the same convolution sums in another order differ by rounding only
    torch.testing.assert_close(whole, alone, rtol=1e-12, atol=1e-12)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="divisible by 2"):
        ConvNet(image_size=30, channels=(8, 8))
    with pytest.raises(ValueError, match="groups"):
        ConvNet(image_size=32, channels=(12,), groups=8)
    with pytest.raises(ValueError, match="norm"):
        ConvNet(image_size=32, channels=(8,), norm="layer")


def test_lock_freezes_all_but_the_last_stages():
    tower = _tower()
    frozen = tower.lock(unlocked_blocks=1)
    assert len(frozen) == 2
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in tower.blocks[-1].parameters()) and tower.norm.weight.requires_grad
    whole = _tower()
    assert whole.lock() == [whole] and not any(p.requires_grad for p in whole.parameters())


CONVNET = {"class_path": "vlm.models.convnet.ConvNet", "init_args": {"image_size": 16, "channels": [8, 16]}}


@pytest.mark.parametrize("family, norm", [("clip", "group"), ("clip", "batch"), ("flamingo", "batch")])
def test_a_task_with_a_convnet_tower_is_saved_and_loaded_by_vlm_load(tmp_path, family, norm):
    import copy

    from conftest import TINY_CLIP, TINY_FLAMINGO
    from PIL import Image

    import vlm
    from vlm.formats import build_task

    config = copy.deepcopy(TINY_CLIP if family == "clip" else TINY_FLAMINGO)
    config["init_args"]["model"]["init_args"]["vision"] = copy.deepcopy(CONVNET)
    config["init_args"]["model"]["init_args"]["vision"]["init_args"]["norm"] = norm
    torch.manual_seed(0)
    task = build_task(config)
    if norm == "batch":  # running statistics that are not the defaults, to see them saved and loaded
        for m in task.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / f"{family}.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "inference": task.inference_settings()}, path)
    model = vlm.load(path)
    image = Image.new("RGB", (24, 24), (200, 30, 30))
    if family == "clip":
        tower = model.model.vision
        assert isinstance(tower, ConvNet)
        torch.testing.assert_close(model.embed_images([image]), model.embed_images([image]))
        for name, value in task.model.state_dict().items():
            assert torch.equal(model.model.state_dict()[name], value), name
        assert sorted(label for label, _ in model.classify([image], ["red", "blue"])[0]) == ["blue", "red"]
        # class activation maps: one value per cell of the last feature map, their mean the image-label score
        exp = model.explain([image], ["red", "blue"])[0]
        for label in ["red", "blue"]:
            assert tuple(exp.labels[label].shape) == (tower.grid, tower.grid) and "activation" in exp.maps
            assert exp.labels[label].mean().item() == pytest.approx(exp.scores[label], abs=1e-5)
        assert isinstance(exp.scores["red"], float)
    else:
        assert isinstance(model.model.vision, ConvNet)
        assert isinstance(model.caption([image], max_new_tokens=3)[0], str)
        exp = model.explain([image])[0]
        assert exp.words and all(tuple(m.shape) == (model.model.vision.grid,) * 2 for _, m in exp.words)
