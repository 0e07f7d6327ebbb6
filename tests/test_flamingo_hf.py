"""Hugging Face causal LMs (tiny random GPT-2, OPT and Llama saved locally) as Flamingo's frozen decoder."""

from __future__ import annotations

import pytest
import torch

from vlm.models.hf_decoder import HFCausalLM


@pytest.fixture
def hf_dirs(hf_lm_dirs):
    return hf_lm_dirs


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama"])
def test_adapter_matches_the_hf_model(hf_dirs, name):
    """The adapter's logits, in one pass and decoded step by step with its cache, are Hugging Face's: as close to
    the model's float64 logits as Hugging Face's own float32 forward is."""
    from conftest import assert_fp32_close
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(hf_dirs[name]).eval()
    ref64 = AutoModelForCausalLM.from_pretrained(hf_dirs[name], dtype=torch.float64).eval()
    ours = HFCausalLM(hf_dirs[name]).eval()
    assert len(ours.layers) == 2 and ours.width == 32
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        expected, exact = ref(ids).logits, ref64(ids).logits
        assert_fp32_close(ours(ids), expected, exact, msg="one pass")
        cache = ours.new_cache()
        mask = torch.ones_like(ids)
        steps = [ours(ids[:, :4], mask[:, :4], cache=cache)]
        steps += [ours(ids[:, t : t + 1], mask[:, : t + 1], cache=cache) for t in range(4, 9)]
        assert_fp32_close(torch.cat(steps, 1), expected, exact, msg="cached decoding")


def _task_config(path: str) -> dict:
    return {
        "class_path": "vlm.tasks.captioning.FlamingoTask",
        "init_args": {
            "model": {"class_path": "vlm.models.flamingo.Flamingo", "init_args": {
                "vision": {"class_path": "vlm.models.vit.VisionTransformer",
                           "init_args": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "num_heads": 2}},
                "decoder": {"class_path": "vlm.models.hf_decoder.HFCausalLM", "init_args": {"name_or_path": path}},
                "num_latents": 4, "resampler_depth": 1, "resampler_heads": 2, "cross_attn_heads": 2}},
            "tokenizer": {"class_path": "vlm.data.gpt2_tokenizer.CausalLMTokenizer",
                          "init_args": {"name_or_path": path}},
            "optimizer": {"class_path": "vlm.tasks.optim.AdamW",
                          "init_args": {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}},
            "lr_scheduler": {"class_path": "vlm.tasks.optim.WarmupCosine",
                             "init_args": {"warmup_steps": 1, "min_lr_ratio": 0.1}},
        },
    }


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama"])
def test_hf_decoder_is_frozen_and_only_new_token_rows_train(hf_dirs, name):
    from conftest import assert_fp32_close, build_trainable
    from transformers import AutoModelForCausalLM

    task = build_trainable(_task_config(hf_dirs[name]))
    ref = AutoModelForCausalLM.from_pretrained(hf_dirs[name]).eval()
    ref64 = AutoModelForCausalLM.from_pretrained(hf_dirs[name], dtype=torch.float64).eval()
    decoder = task.model.decoder
    vocab = decoder.vocab_size
    assert task.tokenizer.image_token_id == task.model.image_token_id == vocab  # after the (padded) vocabulary
    captions = ["a small red circle", "a large blue star left of a small green cross"]
    batch = {"image": torch.randn(2, 3, 16, 16), **task.tokenizer.encode_batch(captions)}
    text_ids = torch.randint(0, 50257, (2, 7))
    with torch.no_grad():  # at initialisation: exactly the Hugging Face model
        assert_fp32_close(task.model(batch["image"], text_ids)[..., :vocab], ref(text_ids).logits,
                          ref64(text_ids).logits)
        assert torch.equal(task.model(batch["image"], text_ids)[..., :vocab], decoder(text_ids))
    embedding = decoder.model.get_input_embeddings().weight
    old_rows = embedding.detach().clone()
    old_head = decoder.model.get_output_embeddings().weight.detach().clone()
    new_rows = task.model.new_token_embedding.detach().clone()
    task.train()
    assert not decoder.training
    opt = task.configure_optimizers()["optimizer"]
    for _ in range(2):
        opt.zero_grad()
        task.training_step(batch, 0).backward()
        assert embedding.grad is None and all(p.grad is None for p in decoder.parameters())
        opt.step()
    assert torch.equal(embedding, old_rows)  # the decoder's own vocabulary never moves
    assert torch.equal(decoder.model.get_output_embeddings().weight, old_head)
    moved = (task.model.new_token_embedding - new_rows).abs().sum(1) > 0
    assert moved[:2].all()  # <image> and <|endofchunk|> rows trained


def test_generation_with_hf_decoder_batched_and_cached(hf_dirs):
    from vlm.formats import build_task
    from vlm.generation import generate

    torch.manual_seed(0)
    task = build_task(_task_config(hf_dirs["llama"])).eval()
    for blk in task.model.cross_attn:  # open the gates so the images matter
        blk.attn_gate.data.fill_(1.0)
        blk.mlp_gate.data.fill_(1.0)
    tok = task.tokenizer
    prompts = ["<image>", "<image>A photo of", "<image>a red circle<|endofchunk|><image>"]
    images = torch.randn(3, 2, 3, 16, 16)
    kw = dict(max_new_tokens=6, stop_token_ids=[tok.end_of_chunk_token_id], pad_token_id=tok.pad_token_id)
    singles = []
    for i, p in enumerate(prompts):
        enc = tok.encode_prompts([p])
        n = tok.count_images(p)
        singles.append(generate(task.model, enc["input_ids"], enc["attention_mask"], images=images[i : i + 1, :n],
                                **kw))
    # One left-padded batch of all three (the one-image prompts never reach their second image), cached or not.
    enc = tok.encode_prompts(prompts)
    batched = generate(task.model, enc["input_ids"], enc["attention_mask"], images=images, **kw)
    uncached = generate(task.model, enc["input_ids"], enc["attention_mask"], images=images, use_cache=False, **kw)
    assert torch.equal(batched, uncached)
    for i in range(3):
        assert torch.equal(batched[i, : singles[i].shape[1]], singles[i][0])
    assert len(set(batched[0].tolist())) > 1  # a real sequence, not one repeated token
