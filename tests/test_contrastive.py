"""Contrastive task: the loss against a direct formula, DDP gradients equal one process on the whole batch,
temperature clamping, locking towers, and zero-shot classifier building."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, assert_fp32_close, build_trainable, run_job, tiny_clip_config
from ddp_contrastive import _siglip_config, make_batch

from vlm.formats import build_task
from vlm.losses import clip_loss, siglip_loss
from vlm.metrics import retrieval_recall
from vlm.zero_shot import build_classifier, classify, get_templates

TINY_CLIP_MODEL = TINY_CLIP["init_args"]["model"]


def test_clip_loss_matches_direct_formula():
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * img @ txt.T
    ref = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    torch.testing.assert_close(clip_loss(img, txt, img, txt, scale, offset=0), ref)
    # Two "ranks" each computing their own rows with offset labels average to the one-process loss.
    halves = [clip_loss(img[i : i + 3], txt[i : i + 3], img, txt, scale, offset=i) for i in (0, 3)]
    torch.testing.assert_close(sum(halves) / 2, ref)


def test_siglip_loss_matches_direct_formula():
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale, bias = torch.tensor(2.3), torch.tensor(-10.0)
    logits = scale.exp() * img @ txt.T + bias
    labels = 2 * torch.eye(4) - 1
    ref = -F.logsigmoid(labels * logits).sum() / 4
    torch.testing.assert_close(siglip_loss(img, txt, scale, bias, offset=0), ref)
    halves = [siglip_loss(img[i : i + 2], txt, scale, bias, offset=i) for i in (0, 2)]
    torch.testing.assert_close(sum(halves) / 2, ref)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_ddp_gradients_equal_single_process_on_concatenated_batch(tmp_path, loss):
    script = Path(__file__).with_name("ddp_contrastive.py")
    run_job([[sys.executable, str(script), str(tmp_path), loss]])
    ranks = [torch.load(tmp_path / f"grads_rank{r}.pt") for r in (0, 1)]

    def one_process(dtype):
        torch.manual_seed(0)
        task = build_task(_siglip_config() if loss == "siglip" else tiny_clip_config(warmup_steps=0)).to(dtype)
        images, text = make_batch()
        task.compute_loss(images.to(dtype), text).backward()
        return {n: p.grad for n, p in task.named_parameters() if p.grad is not None}

    ref, exact = one_process(torch.float32), one_process(torch.float64)
    assert set(ranks[0]) == set(ref)
    for name, g in ref.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name])  # DDP left both ranks with the same gradient
        # The ranks' halves are summed in another order than the whole batch: float32 rounding, judged in float64.
        assert_fp32_close(ranks[0][name], g, exact[name], msg=f"gradient of {name}")


def test_logit_scale_is_clamped_after_each_step(tiny_clip_task):
    with torch.no_grad():
        tiny_clip_task.model.logit_scale.fill_(10.0)
    tiny_clip_task.on_train_batch_end(None, None, 0)
    assert tiny_clip_task.model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


def _grads_after_step(task):
    task.train()
    images, text = make_batch(4)
    task.compute_loss(images, text).backward()
    return {n for n, p in task.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_lock_text_tower_trains_only_the_rest():
    task = build_task(tiny_clip_config(lock_text=True))
    trained = _grads_after_step(task)
    assert trained and not any(n.startswith("model.text.") for n in trained)
    assert "model.text_proj.weight" in trained and "model.vision.blocks.0.attn.qkv.weight" in trained
    assert not task.model.text.training  # frozen towers stay in eval mode


def test_lock_image_with_unlocked_last_block():
    task = build_task(tiny_clip_config(lock_image=True, lock_image_unlocked_blocks=1))
    trained = _grads_after_step(task)
    assert not any(n.startswith("model.vision.blocks.0.") for n in trained)
    assert "model.vision.blocks.1.attn.qkv.weight" in trained and "model.vision.norm.weight" in trained
    assert not any(n.startswith(("model.vision.patch_embed", "model.vision.pos_embed")) for n in trained)
    optim = task.configure_optimizers()["optimizer"]
    in_optim = {id(p) for g in optim.param_groups for p in g["params"]}
    assert all(p.requires_grad == (id(p) in in_optim) for p in task.parameters())


def test_lightning_freeze_still_freezes_the_whole_task():
    """The task base freezes its parts with freeze_parts; Lightning's own freeze() (whole task, eval) is untouched."""
    task = build_task(tiny_clip_config(lock_text=True))
    task.train()
    assert task.model.vision.training and not task.model.text.training
    task.freeze()
    assert not task.training and not any(p.requires_grad for p in task.parameters())


def test_the_vision_tower_locks_itself_as_open_clip_towers_do():
    task = build_task(tiny_clip_config())
    tower = task.model.vision
    frozen = tower.lock(1)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "norm.", "fc_norm.")) for n in trainable)
    assert tower.blocks[0] in frozen and tower.patch_embed in frozen and tower.blocks[1] not in frozen
    assert tower.lock(0) == [tower] and not any(p.requires_grad for p in tower.parameters())
    with pytest.raises(ValueError, match="unlocked_blocks must be >= 0"):
        tower.lock(-1)


def test_retrieval_recall_perfect_and_duplicate_captions():
    x = F.normalize(torch.randn(5, 8), dim=-1)
    r = retrieval_recall(x, x)
    assert r["image_to_text_R@1"] == 1.0 and r["text_to_image_R@1"] == 1.0
    t = torch.stack([x[0], x[0], x[2], x[3], x[4]])  # two images share one caption: not a miss
    assert retrieval_recall(t, t)["image_to_text_R@1"] == 1.0


def test_zero_shot_classifier_is_a_normalised_template_ensemble(tiny_clip_task):
    model, tok = tiny_clip_task.model.eval(), tiny_clip_task.tokenizer
    clf = build_classifier(model, tok, ["red circle", "blue square"], ["a {}", "a small {}"])
    assert clf.shape == (2, 16)
    torch.testing.assert_close(clf.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        e = model.encode_text(tok(["a red circle", "a small red circle"]))
    torch.testing.assert_close(clf[0], F.normalize(e.mean(0), dim=-1))
    probs = classify(model, torch.randn(3, 3, 16, 16), clf)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    with pytest.raises(ValueError, match="non-blank"):
        build_classifier(model, tok, ["  "], ["a {}"])


def test_named_template_sets():
    assert len(get_templates("openai")) == 80
    assert get_templates("simple") == ["a photo of a {}."]
    paraphrased = get_templates("paraphrased")
    assert len(paraphrased) >= 3 and all(t.count("{}") == 1 for t in paraphrased)
    # worded away from the training captions "a [size] colour shape": no prompt is just "a {}" with a size word
    assert not {"a {}", "a small {}", "a large {}"} & set(paraphrased)
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("nonsense")


def test_cached_locked_text_features_give_the_same_loss_and_gradients():
    images, text = make_batch(8)
    text[4:] = text[:4]  # recurring captions, as in the synthetic data
    plain = build_task(tiny_clip_config(lock_text=True))
    cached = build_task(tiny_clip_config(lock_text=True, cache_locked_text=True))
    cached.load_state_dict(plain.state_dict())
    rows = []
    cached.model.text.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    for _ in range(2):  # the second step is served from the cache
        for task in (plain, cached):
            task.zero_grad()
            task.compute_loss(images, text).backward()
        for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert rows == [4]  # four distinct captions, encoded once
    with pytest.raises(ValueError, match="cache_locked_text needs lock_text"):
        build_task(tiny_clip_config(cache_locked_text=True))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_same_caption_positive(loss):
    images, text = make_batch(8)
    cfg = _siglip_config() if loss == "siglip" else tiny_clip_config()
    plain = build_task(cfg)
    cfg["init_args"]["same_caption_positive"] = True
    task = build_task(cfg)
    task.load_state_dict(plain.state_dict())
    # All captions distinct: exactly the usual loss.
    torch.testing.assert_close(task.compute_loss(images, text), plain.compute_loss(images, text))
    text[4:] = text[:4]  # caption i == caption i + 4
    img, txt = task.model(images, text)
    same = torch.eye(8, dtype=torch.bool) | torch.eye(8, dtype=torch.bool).roll(4, dims=1)
    logits = task.model.logit_scale.exp() * img @ txt.T
    if loss == "clip":  # the target spread over both matching captions / images
        ref = -(F.log_softmax(logits, 1)[same].mean() + F.log_softmax(logits.T, 1)[same].mean()) / 2
    else:
        logits = logits + task.model.logit_bias
        ref = -F.logsigmoid((same.float() * 2 - 1) * logits).sum() / 8
    torch.testing.assert_close(task.compute_loss(images, text), ref)
    if loss == "clip":  # two "ranks" with their rows of `same` average to the one-process loss
        halves = [clip_loss(img[i:i + 4], txt[i:i + 4], img, txt, task.model.logit_scale, i, same[i:i + 4])
                  for i in (0, 4)]
        torch.testing.assert_close(sum(halves) / 2, ref)


def test_init_weights_start_training_from_a_checkpoint_but_not_a_resume(tmp_path):
    from types import SimpleNamespace

    source = build_task(tiny_clip_config())
    path = tmp_path / "clip.ckpt"
    torch.save({"state_dict": source.state_dict(), "global_step": 7}, path)
    torch.manual_seed(1)
    task = build_trainable(tiny_clip_config(init_weights=str(path)))
    assert not torch.equal(task.model.vision.pos_embed, source.model.vision.pos_embed)
    task.trainer = SimpleNamespace(ckpt_path=str(tmp_path / "resume.ckpt"))
    task.setup("fit")  # resuming: the resumed checkpoint brings the weights, init_weights is not read
    assert not torch.equal(task.model.vision.pos_embed, source.model.vision.pos_embed)
    task.trainer = SimpleNamespace(ckpt_path=None)
    task.setup("fit")
    for name, value in source.model.state_dict().items():
        assert torch.equal(task.model.state_dict()[name], value), name


def test_init_weights_from_an_open_clip_checkpoint_file(tmp_path):
    """A user with open_clip weights in a local file fine-tunes from them: the file is converted to vlm's names, and
    the model starts from exactly those weights (an open_clip model built from the same vlm weights)."""
    from safetensors.torch import save_file

    from vlm.interop import to_open_clip

    def open_clip_shaped(embed_dim: int = 16) -> dict:  # the tiny CLIP as open_clip builds it (no patch bias)
        vision = {**TINY_CLIP_MODEL["init_args"]["vision"], "init_args": {
            **TINY_CLIP_MODEL["init_args"]["vision"]["init_args"], "patch_bias": False}}  # fmt: skip
        return tiny_clip_config(model={**TINY_CLIP_MODEL, "init_args": {
            **TINY_CLIP_MODEL["init_args"], "vision": vision, "embed_dim": embed_dim}})  # fmt: skip

    torch.manual_seed(3)
    source = build_task(open_clip_shaped()).model
    peer = to_open_clip(source)
    paths = {"pt": tmp_path / "open_clip_model.pt", "safetensors": tmp_path / "open_clip_model.safetensors"}
    torch.save(peer.state_dict(), paths["pt"])
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(paths["safetensors"]))
    for path in paths.values():
        torch.manual_seed(1)
        config = open_clip_shaped()
        config["init_args"]["init_weights"] = str(path)
        task = build_trainable(config)
        assert not torch.equal(task.model.vision.pos_embed, source.vision.pos_embed)
        task.setup("fit")
        for name, value in source.state_dict().items():
            assert torch.equal(task.model.state_dict()[name], value), (path.suffix, name)
    torch.save(to_open_clip(build_task(open_clip_shaped(8)).model).state_dict(), tmp_path / "narrow.pt")
    config = open_clip_shaped()
    config["init_args"]["init_weights"] = str(tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"init_weights=.*narrow\.pt.*"):
        build_trainable(config).setup("fit")


def test_init_weights_that_do_not_match_name_the_problem(tmp_path):
    wider = build_task(tiny_clip_config(model={**TINY_CLIP_MODEL, "init_args": {
        **TINY_CLIP_MODEL["init_args"], "embed_dim": 8}}))
    path = tmp_path / "wider.ckpt"
    torch.save({"state_dict": wider.state_dict()}, path)
    with pytest.raises(ValueError, match=r"init_weights=.*wider\.ckpt.*first mismatched key .*_proj"):
        build_trainable(tiny_clip_config(init_weights=str(path))).setup("fit")
    with pytest.raises(ValueError, match="no weights under the prefix 'clip.'"):
        build_trainable(tiny_clip_config(init_weights=str(path), init_weights_prefix="clip.")).setup("fit")
    with pytest.raises(ValueError, match="not found"):
        build_trainable(tiny_clip_config(init_weights=str(tmp_path / "missing.ckpt"))).setup("fit")


def test_fit_with_a_missing_init_checkpoint_is_one_error_line(tmp_path, capsys):
    """Stage 1b run before stage 1a: `vlm fit` names the missing file, exits 2, no traceback."""
    from vlm.__main__ import main as vlm_main
    from vlm.data import shapes as S

    root = tmp_path / "shapes"
    S.generate_shapes(root, train=40, val=36, seed=0, image_size=32, processes=1, two_object_prob=0.25)
    configs = Path(__file__).parent.parent / "configs" / "clip"
    missing = tmp_path / "stage1a" / "last.ckpt"
    code = vlm_main(["fit", "--config", str(configs / "shapes.yaml"), "--config", str(configs / "shapes_scenes.yaml"),
                     f"--model.init_args.init_weights={missing}", f"--data.init_args.source.init_args.data_dir={root}",
                     "--data.init_args.source.init_args.num_train=40", "--data.init_args.source.init_args.num_val=36",
                     "--data.init_args.source.init_args.image_size=32",
                     f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false",
                     "--trainer.enable_model_summary=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"vlm: error: cannot start from init_weights='{missing}': weights file not found" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
