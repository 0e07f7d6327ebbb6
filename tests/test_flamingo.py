"""Flamingo: identity at initialisation, media masking, the Perceiver Resampler, freezing, interleaved sequences."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_fp32_close

from vlm.models.decoder import DecoderLM
from vlm.models.flamingo import Flamingo, GatedCrossAttentionBlock
from vlm.models.perceiver import PerceiverResampler
from vlm.models.vit import VisionTransformer

V = 64  # vocabulary of the tiny decoders: <image> = 64, <|endofchunk|> = 65


def tiny_flamingo(media_attend: str = "latest", cross_attn_every: int = 1, gates: float | None = None) -> Flamingo:
    vision = VisionTransformer(image_size=16, patch_size=8, width=16, depth=1, num_heads=2)
    decoder = DecoderLM(vocab_size=V, context_length=32, width=32, depth=3, num_heads=2)
    model = Flamingo(vision, decoder, cross_attn_every=cross_attn_every, cross_attn_heads=2, num_latents=4,
                     resampler_depth=1, resampler_heads=2, media_attend=media_attend).eval()
    if gates is not None:  # open the gates, as training would
        for blk in model.cross_attn:
            blk.attn_gate.data.fill_(gates)
            blk.mlp_gate.data.fill_(gates)
    return model


def test_resampler_reads_the_chosen_vision_layer():
    vision = VisionTransformer(image_size=16, patch_size=8, width=16, depth=3, num_heads=2).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x = vision.intermediate_tokens(images, skip_last_blocks=1)
        # the output of the first two blocks, as a forward that stopped there (no final norm) computes it
        stem = vision.patch_embed(images)
        h = torch.cat([vision.cls_token.expand(2, -1, -1), stem], dim=1) + vision.pos_embed
        for blk in vision.blocks[:2]:
            h = blk(vision.norm_pre(h) if blk is vision.blocks[0] else h)
        torch.testing.assert_close(x, h)
        assert not torch.allclose(x, vision.forward_tokens(images))
        decoder = DecoderLM(vocab_size=V, context_length=32, width=32, depth=1, num_heads=2)
        model = Flamingo(vision, decoder, cross_attn_heads=2, num_latents=4, resampler_depth=1, resampler_heads=2,
                         visual_layer=-2).eval()
        expected = model.resampler(x[:, None, None])
        torch.testing.assert_close(model.encode_media(images), expected)
    with pytest.raises(ValueError, match="skip_last_blocks"):
        vision.intermediate_tokens(images, skip_last_blocks=3)
    for bad in (0, -4):  # the tower has 3 blocks: -1, -2, -3 are its layers
        with pytest.raises(ValueError, match="visual_layer"):
            Flamingo(vision, decoder, cross_attn_heads=2, num_latents=4, resampler_heads=2, visual_layer=bad)


# ------------------------------------------------------------------------------------------- gated block
def test_gated_block_is_exactly_the_identity_at_init():
    blk = GatedCrossAttentionBlock(dim=32, media_dim=16, num_heads=4)
    x, media = torch.randn(2, 5, 32), torch.randn(2, 8, 16)
    mask = torch.rand(2, 5, 8) > 0.5
    mask[0, 0] = False  # a token that sees no image
    assert torch.equal(blk(x, media, mask), x)


def test_rows_without_media_get_zero_cross_attention():
    blk = GatedCrossAttentionBlock(dim=32, media_dim=16, num_heads=4)
    blk.attn_gate.data.fill_(1.0)  # attention branch on, feed-forward branch off
    x, media = torch.randn(1, 3, 32), torch.randn(1, 8, 16)
    mask = torch.zeros(1, 3, 8, dtype=torch.bool)
    mask[0, 2, :4] = True
    out = blk(x, media, mask)
    assert torch.equal(out[0, :2], x[0, :2])  # no image yet: exactly nothing added, no NaN
    assert not torch.allclose(out[0, 2], x[0, 2])
    # precomputed media keys/values (the decoding path) give the same result
    torch.testing.assert_close(blk(x, None, mask, media_kv=blk.attn.project_context(media)), out)


def test_flamingo_at_init_is_exactly_the_frozen_decoder():
    model = tiny_flamingo()
    ids = torch.randint(0, V, (2, 10))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(images, ids)[..., :V], model.decoder(ids))
        with_image = torch.cat([ids[:, :3], torch.full((2, 1), model.image_token_id), ids[:, 3:]], dim=1)
        hidden = model.forward_features(images, with_image)
        plain = model.decoder.forward_hidden(model.embed(with_image))
    assert torch.equal(hidden, plain)


def test_unembed_of_a_token_subset_equals_the_full_logits_restricted():
    model = tiny_flamingo()
    model.new_token_unembedding.data.normal_()
    hidden = torch.randn(5, 32)
    ids = torch.tensor([1, 7, 30, V, V + 1])  # old and new tokens, sorted
    torch.testing.assert_close(model.unembed(hidden, ids), model.unembed(hidden)[:, ids])
    assert model.unembed(hidden).shape == (5, V + 3)


# ----------------------------------------------------------------------------------------- media masking
def test_media_mask_latest_and_all():
    img = V
    ids = torch.tensor([[5, img, 6, 7, img, 8]])
    latest = tiny_flamingo("latest").media_mask(ids, num_media=2)  # (1, 6, 2 images * 4 latents)
    seen = latest.view(6, 2, 4).any(-1)  # which image each token sees
    assert seen.tolist() == [[False, False], [True, False], [True, False], [True, False], [False, True],
                             [False, True]]
    assert latest.view(6, 2, 4).all(-1).eq(seen).all()  # all latents of a seen image
    every = tiny_flamingo("all").media_mask(ids, num_media=2).view(6, 2, 4).any(-1)
    assert every.tolist() == [[False, False], [True, False], [True, False], [True, False], [True, True],
                              [True, True]]
    # continuing after cached tokens: the images already seen are counted in
    cont = tiny_flamingo("latest").media_mask(torch.tensor([[9]]), 2, images_before=torch.tensor([1]))
    assert cont.view(2, 4).any(-1).tolist() == [True, False]


def _first_block_output(model: Flamingo, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Output of the first gated block (before any decoder layer mixes the tokens by self-attention)."""
    seen = []
    handle = model.cross_attn[0].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        hidden = model.forward_features(images, ids)
    handle.remove()
    return seen[0], hidden


@pytest.mark.parametrize("attend", ["latest", "all"])
def test_each_token_sees_only_the_images_it_may(attend):
    torch.manual_seed(0)
    model = tiny_flamingo(attend, gates=0.7)
    ids = torch.tensor([[3, 4, V, 5, 6, V + 1, V, 7, 8, V + 1]])  # text, image 1, text, image 2, text
    images = torch.randn(1, 2, 3, 16, 16)
    base, base_hidden = _first_block_output(model, images, ids)
    # The unchanged outputs in float64: a token that does not see the changed image keeps its value, up to the
    # rounding of float32 sums grouped differently (and CPU-dependently), which this reference bounds.
    exact, exact_hidden = _first_block_output(copy.deepcopy(model).double(), images.double(), ids)
    other_first = images.clone()
    other_first[:, 0] = torch.randn(3, 16, 16)
    changed, changed_hidden = _first_block_output(model, other_first, ids)
    # Before the first image the images do not matter at all, in any layer.
    assert torch.equal(changed_hidden[:, :2], base_hidden[:, :2])
    assert not torch.allclose(changed[:, 2:6], base[:, 2:6])  # the first chunk attends to image 1
    if attend == "latest":  # the second chunk attends to image 2 only
        assert_fp32_close(changed[:, 6:], base[:, 6:], exact[:, 6:], msg="second chunk")
    else:
        assert not torch.allclose(changed[:, 6:], base[:, 6:])
    other_second = images.clone()
    other_second[:, 1] = torch.randn(3, 16, 16)
    changed, changed_hidden = _first_block_output(model, other_second, ids)
    assert_fp32_close(changed_hidden[:, :6], base_hidden[:, :6], exact_hidden[:, :6], msg="before image 2")
    assert not torch.allclose(changed[:, 6:], base[:, 6:])


def test_cross_attention_every_k_layers():
    model = tiny_flamingo(cross_attn_every=2)
    assert model.cross_attn_layers == [0, 2] and len(model.cross_attn) == 2
    assert len(model.decoder.state_dict()) == len(DecoderLM(V, 32, 32, 3, 2).state_dict())  # decoder keys intact


def test_deepcopy_keeps_hooks_on_the_copy():
    model = tiny_flamingo(gates=0.5)
    clone = copy.deepcopy(model)
    for blk in clone.cross_attn:
        blk.attn_gate.data.zero_()
        blk.mlp_gate.data.zero_()
    ids, images = torch.tensor([[3, V, 5, 6]]), torch.randn(1, 3, 16, 16)
    with torch.no_grad():  # the copy runs its own (closed) gates, the original its open ones
        assert torch.equal(clone.forward_features(images, ids), clone.decoder.forward_hidden(clone.embed(ids)))
        assert not torch.allclose(model.forward_features(images, ids), model.decoder.forward_hidden(model.embed(ids)))


# ------------------------------------------------------------------------------------------- perceiver
def test_perceiver_shapes():
    r = PerceiverResampler(dim=16, depth=2, num_heads=2, num_latents=5, max_frames=3)
    out = r(torch.randn(2, 4, 3, 7, 16))  # 2 samples, 4 media, 3 frames, 7 tokens each
    assert out.shape == (2, 4, 5, 16)
    with pytest.raises(ValueError, match="time embeddings"):
        r(torch.randn(1, 1, 4, 7, 16))


def test_perceiver_time_embeddings_tell_frames_apart():
    torch.manual_seed(0)
    r = PerceiverResampler(dim=16, depth=1, num_heads=2, num_latents=3, max_frames=2).eval()
    r.time_embedding.data.normal_(0, 1.0)
    x = torch.randn(1, 1, 2, 5, 16)
    swapped = x.flip(2)  # the same frames in the other order
    assert not torch.allclose(r(x), r(swapped), atol=1e-4)
    r.time_embedding.data.zero_()  # without time embeddings, attention cannot see the order
    # the frames' sums in another order: as close to the float64 result as the first order's float32 one
    assert_fp32_close(r(swapped), r(x), copy.deepcopy(r).double()(x.double()))


def test_perceiver_media_are_resampled_independently():
    r = PerceiverResampler(dim=16, depth=1, num_heads=2, num_latents=3).eval()
    x = torch.randn(1, 2, 1, 5, 16)
    y = x.clone()
    y[:, 1] = torch.randn(1, 1, 5, 16)
    torch.testing.assert_close(r(x)[:, 0], r(y)[:, 0])


# ----------------------------------------------------------------------------------------- task, freezing
TINY_TASK = {
    "class_path": "vlm.tasks.captioning.FlamingoTask",
    "init_args": {
        "model": {"class_path": "vlm.models.flamingo.Flamingo", "init_args": {
            "vision": {"class_path": "vlm.models.vit.VisionTransformer",
                       "init_args": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 2, "num_heads": 2}},
            "decoder": {"class_path": "vlm.models.decoder.DecoderLM",
                        "init_args": {"context_length": 40, "width": 32, "depth": 2, "num_heads": 2}},
            "num_latents": 4, "resampler_depth": 1, "resampler_heads": 2, "cross_attn_heads": 2}},
        "optimizer": {"class_path": "vlm.tasks.optim.AdamW",
                      "init_args": {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}},
        "lr_scheduler": {"class_path": "vlm.tasks.optim.WarmupCosine",
                         "init_args": {"warmup_steps": 1, "min_lr_ratio": 0.1}},
    },
}


def build_tiny_task(**overrides):
    from conftest import build_trainable

    cfg = copy.deepcopy(TINY_TASK)
    cfg["init_args"].update(overrides)
    return build_trainable(cfg)


def test_frozen_parts_get_no_gradient_and_do_not_change():
    task = build_tiny_task()
    task.train()
    assert not task.model.vision.training and not task.model.decoder.training  # frozen parts stay in eval mode
    assert task.model.resampler.training
    frozen = {n: p.detach().clone() for n, p in task.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    assert all(n.startswith(("model.vision.", "model.decoder.")) for n in frozen)
    assert all(not n.startswith(("model.vision.", "model.decoder.")) for n in trainable)
    opt = task.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in task.parameters() if p.requires_grad}
    batch = {"image": torch.randn(4, 3, 16, 16),
             **task.tokenizer.encode_batch(["a small red circle", "a large blue star", "a red cross",
                                            "a small green square left of a large red star"])}
    for _ in range(3):  # the gates open at step 1, then every bridge parameter receives gradient
        opt.zero_grad()
        task.training_step(batch, 0).backward()
        assert all(p.grad is None for n, p in task.named_parameters() if n in frozen)
        opt.step()
    for n, p in task.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        elif n != "model.new_token_embedding":  # only rows of tokens in the batch move
            assert not torch.equal(p, trainable[n]), n
    rows = task.model.new_token_embedding
    assert not torch.equal(rows[:2], trainable["model.new_token_embedding"][:2])  # <image>, <|endofchunk|>


def test_flamingo_tokenizer_layout_and_labels():
    from vlm.data.gpt2_tokenizer import IGNORE_INDEX

    task = build_tiny_task(prompt="A photo of")
    tok = task.tokenizer
    assert (tok.image_token_id, tok.end_of_chunk_token_id, tok.pad_token_id) == (50257, 50258, 50259)
    assert tok.image_token_id == task.model.image_token_id
    batch = tok.encode_batch(["a red circle", "a large blue star left of a small green cross"])
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids[0, :2].tolist() == [tok.bos_token_id, tok.image_token_id]
    prompt_len = len(tok.encode("A photo of"))
    assert (labels[0, : 2 + prompt_len] == IGNORE_INDEX).all()  # bos, <image>, the prompt
    n = int(batch["attention_mask"][0].sum())
    assert labels[0, 2 + prompt_len : n].tolist() == ids[0, 2 + prompt_len : n].tolist()
    assert tok.end_of_chunk_token_id in labels[0].tolist() and (labels[0, n:] == IGNORE_INDEX).all()
    assert tok.decode(ids[0]) == "A photo of a red circle"


def test_interleaved_sequences_train():
    task = build_tiny_task(images_per_sequence=2)
    task.train()
    captions = ["a small red circle", "a large blue star", "a red cross", "a green square"]
    batch = {"image": torch.randn(4, 3, 16, 16), "caption": captions, **task.tokenizer.encode_batch(captions)}
    images, ids, labels = task._interleave(batch)
    assert images.shape == (2, 2, 3, 16, 16)
    assert (ids == task.model.image_token_id).sum(1).tolist() == [2, 2]
    assert not (labels == task.model.image_token_id).any()  # <image> is never a target
    assert (labels == task.model.end_of_chunk_token_id).sum(1).tolist() == [2, 2]
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss)


def test_input_noise_swaps_caption_words_between_rows_and_keeps_every_label():
    from vlm.tasks.captioning import swap_input_words

    task = build_tiny_task(input_noise=0.5)
    tok = task.tokenizer
    captions = ["a small red circle", "a large blue star", "a green square", "a small green square left of a red star"]
    enc = tok.encode_batch(captions)
    ids, labels = enc["input_ids"], enc["labels"]
    special = ids >= task.model.decoder.vocab_size
    words = (labels != -100) & ~special & (ids != tok.eos_token_id)
    assert torch.equal(swap_input_words(ids, labels, 0.0, task.model.decoder.vocab_size, tok.eos_token_id), ids)
    swapped_any = torch.zeros_like(ids, dtype=torch.bool)
    for seed in range(20):
        out = swap_input_words(ids, labels, 0.5, task.model.decoder.vocab_size, tok.eos_token_id,
                               generator=torch.Generator().manual_seed(seed))
        changed = out != ids
        assert not (changed & ~words).any()  # bos, <image>, <|endofchunk|>, eos and padding never change
        # every new word is the word at the same position of another caption
        for i, j in changed.nonzero().tolist():
            assert any(out[i, j] == ids[k, j] and words[k, j] for k in range(len(captions)) if k != i)
        swapped_any |= changed
    assert swapped_any[words & (ids != ids.roll(1, 0))].float().mean() > 0.5  # swaps do happen where words differ
    # the training step uses it (the labels it scores are the true captions) and is deterministic per seed
    task.train()
    batch = {"image": torch.randn(4, 3, 16, 16), "caption": captions, **enc}
    torch.manual_seed(0)
    noisy = task.training_step(batch, 0)
    task.input_noise = 0.0
    clean = task.training_step(batch, 0)
    assert torch.isfinite(noisy) and not torch.equal(noisy, clean)
    with pytest.raises(ValueError, match="input_noise"):
        build_tiny_task(input_noise=1.0)


def test_checkpoint_is_self_contained(tmp_path):
    """Frozen parts are read from earlier stages when training starts; the saved Flamingo needs them no more."""
    import lightning as L

    from vlm.formats import build_task, load_task

    torch.manual_seed(0)
    clip_cfg = {"class_path": "vlm.tasks.contrastive.ContrastiveTask", "init_args": {"model": {
        "class_path": "vlm.models.clip.CLIP", "init_args": {
            "vision": TINY_TASK["init_args"]["model"]["init_args"]["vision"],
            "text": {"class_path": "vlm.models.text.TextTransformer",
                     "init_args": {"context_length": 8, "width": 16, "depth": 1, "num_heads": 2}},
            "embed_dim": 8}}}}
    lm_cfg = {"class_path": "vlm.tasks.language.LanguageModelTask",
              "init_args": {"model": TINY_TASK["init_args"]["model"]["init_args"]["decoder"]}}
    sources = {}
    for name, cfg in (("clip", clip_cfg), ("lm", lm_cfg)):
        src = build_task(cfg)
        sources[name] = src
        torch.save({"state_dict": src.state_dict(), "hyper_parameters": dict(src.hparams)}, tmp_path / f"{name}.ckpt")
    task = build_tiny_task(vision_weights=str(tmp_path / "clip.ckpt"), decoder_weights=str(tmp_path / "lm.ckpt"))
    assert not torch.equal(task.model.vision.pos_embed, sources["clip"].model.vision.pos_embed)  # not read yet
    captions = ["a small red circle", "a large blue star"] * 2
    data = [{"image": torch.randn(3, 16, 16), "caption": c} for c in captions]

    def collate(rows):
        return {"image": torch.stack([r["image"] for r in rows]), "caption": [r["caption"] for r in rows],
                **task.tokenizer.encode_batch([r["caption"] for r in rows])}

    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, train_dataloaders=loader)
    assert torch.equal(task.model.vision.pos_embed, sources["clip"].model.vision.pos_embed)
    assert torch.equal(task.model.decoder.token_embedding.weight, sources["lm"].model.token_embedding.weight)
    trainer.save_checkpoint(tmp_path / "flamingo.ckpt")
    (tmp_path / "clip.ckpt").unlink()
    (tmp_path / "lm.ckpt").unlink()
    loaded = load_task(tmp_path / "flamingo.ckpt")
    assert bool(loaded.pretrained_loaded)
    task.eval()
    batch = collate(data[:2])
    with torch.no_grad():
        expected = task.model(batch["image"], batch["input_ids"])
        torch.testing.assert_close(loaded.model(batch["image"], batch["input_ids"]), expected)
    assert loaded.generate_captions(batch["image"]) == task.generate_captions(batch["image"])
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(loaded, train_dataloaders=loader)  # fine-tuning a rebuilt task does not look for the sources


def test_wrong_weights_give_a_clear_error(tmp_path):
    from vlm.formats import build_task

    lm = build_task({"class_path": "vlm.tasks.language.LanguageModelTask", "init_args": {"model": {
        "class_path": "vlm.models.decoder.DecoderLM",
        "init_args": {"context_length": 40, "width": 16, "depth": 2, "num_heads": 2}}}})
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams)}, tmp_path / "lm.ckpt")
    task = build_tiny_task(decoder_weights=str(tmp_path / "lm.ckpt"))
    with pytest.raises(ValueError, match="does not match the decoder"):
        task.load_pretrained()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_and_generation_on_gpu_in_bf16():
    from vlm.generation import generate

    task = build_tiny_task().cuda().train()
    captions = ["a small red circle", "a large blue star left of a small green cross"]
    batch = {"image": torch.randn(2, 3, 16, 16, device="cuda"),
             **{k: v.cuda() for k, v in task.tokenizer.encode_batch(captions).items()}}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and task.model.cross_attn[0].attn_gate.grad is not None
    task.eval()
    for blk in task.model.cross_attn:
        blk.attn_gate.data.fill_(1.0)
    enc = {k: v.cuda() for k, v in task.tokenizer.encode_prompts(["<image>", "<image>A photo of"]).items()}
    kw = dict(images=batch["image"], max_new_tokens=5, pad_token_id=task.tokenizer.pad_token_id)
    cached = generate(task.model, enc["input_ids"], enc["attention_mask"], **kw)
    assert torch.equal(cached, generate(task.model, enc["input_ids"], enc["attention_mask"], use_cache=False, **kw))
    assert len(task.generate_captions(batch["image"])) == 2


def test_activation_checkpointing_of_the_frozen_decoder_keeps_bridge_gradients():
    """The recomputed decoder layers replay their gated cross-attention with the same visual context."""
    torch.manual_seed(0)
    plain = tiny_flamingo(gates=0.5)
    ckpt = copy.deepcopy(plain)
    ckpt.decoder.grad_checkpointing = True
    ids = torch.tensor([[3, V, 5, 6, V + 1, 7]])
    images = torch.randn(1, 3, 16, 16)
    exact = copy.deepcopy(plain).double()
    for model in (plain, ckpt, exact):
        model.decoder.requires_grad_(False)
        model.vision.requires_grad_(False)
        model(images.to(next(model.parameters()).dtype), ids).logsumexp(-1).sum().backward()
    # the recomputed forward may accumulate in another order: compared with the float64 gradients
    for (name, a), b, e in zip(plain.named_parameters(), ckpt.parameters(), exact.parameters()):
        if a.requires_grad:
            assert_fp32_close(b.grad, a.grad, e.grad, msg=name)


def test_learn_input_words_trains_only_the_rows_outside_the_closed_vocabulary():
    """With a closed vocabulary, the decoder's input rows of the other words (here the prompt's, never in a caption
    of the language model) learn with the bridge; the vocabulary's rows and every other decoder weight stay."""
    task = build_tiny_task(prompt="A photo of", vocabulary=["a", "red", "blue", "circle", "star"],
                           learn_input_words=True)
    task.train()
    weight = task.model.decoder.token_embedding.weight
    before = weight.detach().clone()
    others = {n: p.detach().clone() for n, p in task.model.decoder.named_parameters() if p is not weight}
    opt = task.configure_optimizers()["optimizer"]
    assert id(weight) in {id(p) for g in opt.param_groups for p in g["params"]}
    batch = {"image": torch.randn(2, 3, 16, 16), **task.tokenizer.encode_batch(["a red circle", "a blue star"])}
    for _ in range(3):
        opt.zero_grad()
        task.training_step(batch, 0).backward()
        opt.step()
    changed = set((weight != before).any(dim=1).nonzero().flatten().tolist())
    vocab = set(task.vocab_ids.tolist())
    fed = set(batch["input_ids"].flatten().tolist()) - {task.tokenizer.pad_token_id}
    prompt_words = {i for i in fed if i < weight.shape[0]} - vocab  # "A", " photo", " of" and end-of-text
    assert prompt_words and changed == prompt_words
    assert all(torch.equal(p, others[n]) for n, p in task.model.decoder.named_parameters() if p is not weight)
    with pytest.raises(ValueError, match="learn_input_words needs a closed vocabulary"):
        build_tiny_task(learn_input_words=True)
