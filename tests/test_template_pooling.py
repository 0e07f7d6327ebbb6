"""template_pooling: a class's prompts averaged in embedding space (CLIP's ensemble, ``mean``) or each prompt its own
classifier and the class probability summed over which prompt fits (``marginal``); through the task's validation,
checkpoints, ``vlm.load`` and ``scripts/zero_shot.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_clip_config

import vlm
from vlm.formats import CheckpointError, build_task
from vlm.zero_shot import build_classifier, class_logits, pooled_classifier


def test_marginal_logits_are_the_log_mean_over_templates_of_the_exponentiated_scaled_cosine():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    classifier = F.normalize(torch.randn(2, 5, 4, dtype=torch.float64), dim=-1)  # 2 templates, 5 classes
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    got = class_logits(features, classifier, scale)
    for b in range(3):
        for c in range(5):
            terms = [math.exp(10.0 * float(features[b] @ classifier[t, c])) for t in range(2)]
            assert math.isclose(float(got[b, c]), math.log(sum(terms) / 2), rel_tol=1e-12)
    flat = classifier[0]  # a (c, d) classifier: the scaled cosines, as before
    assert torch.equal(class_logits(features, flat, scale), scale.exp() * features @ flat.T)
    assert torch.allclose(pooled_classifier(classifier), F.normalize(classifier.mean(0), dim=-1))


def test_marginal_pooling_tells_apart_classes_that_the_mean_ensemble_blurs():
    """Two frames that say something about the image (its size). The image is a large X: in the "large" frame (the
    one that fits) X wins clearly; in the "small" frame the text tower happens to put "small Y" nearer the image
    than "small X". The mean of each class's two prompts then prefers Y; the marginal follows the frame that fits."""
    e = torch.eye(4, dtype=torch.float64)
    large, small, x, y = e
    classifier = F.normalize(torch.stack([torch.stack([large + 0.5 * x, large + 0.5 * y]),
                                          torch.stack([small - 0.9 * x, small + 0.9 * x])]), dim=-1)  # fmt: skip
    image = F.normalize((large + 0.5 * x).unsqueeze(0), dim=-1)
    scale = torch.tensor(math.log(100.0), dtype=torch.float64)
    assert class_logits(image, classifier, scale).argmax().item() == 0  # X
    assert class_logits(image, pooled_classifier(classifier), scale).argmax().item() == 1  # Y


def test_build_classifier_marginal_keeps_one_classifier_per_template(tiny_clip_task):
    task = tiny_clip_task
    templates = ["a large {}", "a small {}"]
    per = build_classifier(task.model, task.tokenizer, ["red", "blue"], templates, "marginal")
    assert per.shape == (2, 2, task.model.embed_dim)
    alone = build_classifier(task.model, task.tokenizer, ["red", "blue"], ["a small {}"])
    torch.testing.assert_close(F.normalize(per[1], dim=-1), alone)  # each template's class vectors, unaveraged
    mean = build_classifier(task.model, task.tokenizer, ["red", "blue"], templates)
    torch.testing.assert_close(mean, pooled_classifier(per))
    with pytest.raises(ValueError, match="pooling"):
        build_classifier(task.model, task.tokenizer, ["red"], templates, "max")


def test_the_checkpoint_carries_the_pooling_to_vlm_load_and_the_script(tmp_path):
    config = tiny_clip_config(templates=["a large {}", "a small {}"], template_pooling="marginal")
    with pytest.raises(ValueError, match="template_pooling"):
        build_task(tiny_clip_config(template_pooling="max"))
    torch.manual_seed(0)
    task = build_task(config)
    settings = task.inference_settings()
    assert settings["template_pooling"] == "marginal"
    path = tmp_path / "clip.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "inference": settings}, path)
    model = vlm.load(path)
    images = torch.rand(3, 3, 16, 16)
    labels = ["red", "blue", "green"]
    got = model.classify(images, labels, top_k=3)
    with torch.no_grad():
        features = model.embed_images(images)
        per = build_classifier(model.model, model.tokenizer, labels, ["a large {}", "a small {}"], "marginal")
        probs = class_logits(features, per, model.model.logit_scale).softmax(-1)
    for row, p in zip(got, probs):
        assert [lbl for lbl, _ in row] == [labels[i] for i in p.argsort(descending=True).tolist()]
        assert all(math.isclose(v, float(p[labels.index(lbl)]), rel_tol=1e-5) for lbl, v in row)
    mean = model.classify(images, labels, top_k=3, pooling="mean")  # the caller may ask for the other
    assert mean != got
    # a file from before the option classifies as it did (mean); a value outside the two is refused
    del settings["template_pooling"]
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "inference": settings}, path)
    assert vlm.load(path).template_pooling == "mean"
    settings["template_pooling"] = "__import__('os')"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "inference": settings}, path)
    with pytest.raises(CheckpointError, match="template_pooling"):
        vlm.load(path)
