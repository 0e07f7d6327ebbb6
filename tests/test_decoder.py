"""DecoderLM against Hugging Face GPT-2 with copied weights, its KV cache, padding, and the LM task."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_fp32_close

from vlm.models.decoder import DecoderLM, convert_gpt2_state_dict


def _gpt2_pair(vocab: int = 101, width: int = 32, depth: int = 2, heads: int = 4, context: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=depth, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    ref = GPT2LMHeadModel(cfg).eval()
    ours = DecoderLM(vocab_size=vocab, context_length=context, width=width, depth=depth, num_heads=heads).eval()
    ours.load_state_dict(convert_gpt2_state_dict(ref.state_dict()), strict=True)
    return ref, ours


def test_gpt2_parity_logits_with_and_without_cache():
    ref, ours = _gpt2_pair()
    ids = torch.randint(0, 101, (3, 12))
    with torch.no_grad():  # each as close to HF's float64 logits as HF's own float32 forward
        expected, exact = ref(ids).logits, copy.deepcopy(ref).double()(ids).logits
        assert_fp32_close(ours(ids), expected, exact, msg="one pass")
        cache = ours.new_cache()
        steps = [ours(ids[:, :5], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
        assert_fp32_close(torch.cat(steps, dim=1), expected, exact, msg="cached")
        # HF's own cache agrees too: both caches compute the same function
        out = ref(ids[:, :5], use_cache=True)
        rest = ref(ids[:, 5:], past_key_values=out.past_key_values).logits
        assert_fp32_close(torch.cat([out.logits, rest], 1), expected, exact, msg="HF cached")


def test_gpt2_parity_with_left_padding_and_attention_mask():
    ref, ours = _gpt2_pair()
    ids = torch.randint(0, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # second row left-padded by 4
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=position_ids).logits
        exact = copy.deepcopy(ref).double()(ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask)
    assert_fp32_close(got[mask.bool()], expected[mask.bool()], exact[mask.bool()])
    assert torch.isfinite(got).all()  # padding queries attend to themselves: no NaN anywhere


def test_padded_row_equals_unpadded_row():
    torch.manual_seed(0)
    m = DecoderLM(vocab_size=50, context_length=32, width=32, depth=2, num_heads=4).eval()
    ids = torch.randint(0, 50, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert_fp32_close(m(padded, attention_mask=mask)[:, 3:], m(ids), copy.deepcopy(m).double()(ids))


def test_tied_unembedding_and_gpt2_activation():
    m = DecoderLM(vocab_size=40, context_length=16, width=16, depth=1, num_heads=2)
    h = torch.randn(2, 3, 16)
    torch.testing.assert_close(m.unembed(h), h @ m.token_embedding.weight.T)
    assert "lm_head" not in dict(m.named_parameters())
    assert m.blocks[0].mlp.act.approximate == "tanh"  # GPT-2's "gelu_new"


def test_context_length_is_enforced():
    m = DecoderLM(vocab_size=20, context_length=8, width=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="context length 8"):
        m(torch.zeros(1, 9, dtype=torch.long))
    cache = m.new_cache()
    m(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="context length 8"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = DecoderLM(vocab_size=30, context_length=16, width=16, depth=2, num_heads=2)
    b = DecoderLM(vocab_size=30, context_length=16, width=16, depth=2, num_heads=2, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    exact = copy.deepcopy(a).double()
    ids = torch.randint(0, 30, (2, 7))
    for m in (a, b, exact):
        m(ids).logsumexp(-1).sum().backward()
    for (name, pa), pb, pe in zip(a.named_parameters(), b.parameters(), exact.parameters()):
        assert_fp32_close(pb.grad, pa.grad, pe.grad, msg=name)


def test_lm_tokenizer_batches():
    from vlm.data.gpt2_tokenizer import IGNORE_INDEX, CausalLMTokenizer

    tok = CausalLMTokenizer(context_length=16)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids (the shipped BPE files are GPT-2's)
    batch = tok.encode_batch(["a small red circle", "a large blue square left of a small green star"])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids[0, 0] == tok.bos_token_id == 50256 and ids.shape == labels.shape == mask.shape
    n = int(mask[0].sum())
    assert ids[0, n - 1] == tok.eos_token_id and (labels[0, n:] == IGNORE_INDEX).all()
    assert labels[0, 0] == IGNORE_INDEX and (labels[0, 1:n] == ids[0, 1:n]).all()
    assert tok.decode(ids[1]) == "a large blue square left of a small green star"


def test_language_model_task_trains_and_loss_drops():
    from conftest import build_trainable

    cfg = {"class_path": "vlm.tasks.language.LanguageModelTask", "init_args": {
        "model": {"class_path": "vlm.models.decoder.DecoderLM", "init_args": {
            "context_length": 24, "width": 32, "depth": 1, "num_heads": 2}},
        "optimizer": {"class_path": "vlm.tasks.optim.AdamW",
                      "init_args": {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}},
        "lr_scheduler": {"class_path": "vlm.tasks.optim.WarmupCosine",
                         "init_args": {"warmup_steps": 1, "min_lr_ratio": 0.1}}}}
    task = build_trainable(cfg)
    assert task.hparams["model"]["class_path"] == "vlm.models.decoder.DecoderLM"  # a config, not a module
    batch = task.tokenizer.encode_batch(["a small red circle", "a large blue star above a small red cross"] * 4)
    opt = task.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(8):
        loss = task.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_closed_vocabulary_loss_is_the_softmax_over_those_tokens():
    from vlm.formats import build_task

    words = ["a", "small", "large", "red", "blue", "circle", "star", "left", "of"]
    cfg = {"class_path": "vlm.tasks.language.LanguageModelTask", "init_args": {
        "model": {"class_path": "vlm.models.decoder.DecoderLM", "init_args": {
            "context_length": 24, "width": 32, "depth": 1, "num_heads": 2}},
        "vocabulary": words}}
    task = build_task(cfg)
    ids = task.vocab_ids
    assert task.tokenizer.eos_token_id in ids.tolist() and torch.equal(ids, ids.sort().values)
    batch = task.tokenizer.encode_batch(["a small red circle left of a large blue star"])
    loss = task.compute_loss(batch["input_ids"], batch["labels"])
    with torch.no_grad():
        logits = task.model(batch["input_ids"])[0, :-1][:, ids]  # the full logits, restricted afterwards
    target = batch["labels"][0, 1:]
    keep = target != -100
    index = torch.tensor([ids.tolist().index(t) for t in target[keep].tolist()])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[keep], index))
    outside = task.tokenizer.encode_batch(["a green square"])  # not in the vocabulary: a loud error
    with pytest.raises(ValueError, match="not in the task's vocabulary"):
        task.compute_loss(outside["input_ids"], outside["labels"])


def test_text_data_modules(tmp_path):
    import json

    from vlm.data import shapes
    from vlm.data.gpt2_tokenizer import CausalLMTokenizer
    from vlm.data.text import ShapesTextDataModule, TextDataModule, shapes_captions

    caps = shapes_captions(3000, seed=0)
    assert caps == shapes_captions(3000, seed=0)  # deterministic
    heldout = {f"{c} {s}" for c, s in shapes.HELD_OUT}
    assert any(h in c for c in caps for h in heldout)  # the text corpus names every pair
    assert not any(h in c for c in shapes_captions(3000, 0, all_pairs=False) for h in heldout)
    tok = CausalLMTokenizer(context_length=24)
    dm = ShapesTextDataModule(num_train=64, num_val=16, batch_size=8, tokenizer=tok)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and len(batch["caption"]) == 8
    assert tok.decode(batch["input_ids"][0]) == batch["caption"][0]
    rows = [{"text": "a small red circle"}, {"text": "a large blue star"}, {"text": " "}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = TextDataModule(train=str(tmp_path / "t.jsonl"), batch_size=2, tokenizer=tok)
    dm.setup("fit")
    assert dm.texts("train") == ["a small red circle", "a large blue star"]  # blank texts dropped


def test_auto_vocabulary_is_the_data_words_resolved_at_fit_and_saved_as_the_list(tmp_path):
    import json

    import lightning.pytorch as pl

    from vlm.data.text import TextDataModule
    from vlm.formats import build_task
    from vlm.tasks.language import data_words

    for split, texts in (("train", ["a small red circle", "a large blue star."] * 4), ("val", ["a small blue cross"])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = {"class_path": "vlm.tasks.language.LanguageModelTask", "init_args": {
        "model": {"class_path": "vlm.models.decoder.DecoderLM", "init_args": {
            "context_length": 24, "width": 32, "depth": 1, "num_heads": 2}},
        "vocabulary": "auto"}}
    task = build_task(cfg)
    assert task.vocab_ids is None  # nothing to read the words from yet
    dm = TextDataModule(train=str(tmp_path / "train.jsonl"), val=str(tmp_path / "val.jsonl"), batch_size=4,
                        tokenizer=task.tokenizer)
    words = ["a", "blue", "circle", "cross", "large", "red", "small", "star."]  # validation's "cross" too
    assert data_words(dm) == words
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(task, dm)
    expected = build_task({**cfg, "init_args": {**cfg["init_args"], "vocabulary": words}}).vocab_ids
    assert torch.equal(task.vocab_ids, expected) and len(expected) < 20
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    saved = torch.load(tmp_path / "lm.ckpt", weights_only=False)["hyper_parameters"]
    assert saved["vocabulary"] == words  # a rebuilt task needs no data
    with pytest.raises(ValueError, match="vocabulary must be a list of words, 'auto' or null"):
        build_task({**cfg, "init_args": {**cfg["init_args"], "vocabulary": "automatic"}})
    with pytest.raises(ValueError, match="found no texts"):
        data_words(object())
