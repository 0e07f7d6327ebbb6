"""A context length is stated once, on the model: every task fits its tokenizer to it (a tokenizer may be shorter,
never longer), and what a checkpoint records for inference is the fitted tokenizer."""

from __future__ import annotations

import copy

import torch
from conftest import tiny_clip_config

from vlm.formats import build_task, load_zero_shot

DECODER = {"class_path": "vlm.models.decoder.DecoderLM",
           "init_args": {"context_length": 24, "width": 32, "depth": 1, "num_heads": 2}}
FLAMINGO_MODEL = {"class_path": "vlm.models.flamingo.Flamingo", "init_args": {
    "vision": {"class_path": "vlm.models.vit.VisionTransformer",
               "init_args": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "num_heads": 2}},
    "decoder": DECODER, "num_latents": 4, "resampler_depth": 1, "resampler_heads": 2, "cross_attn_heads": 2}}
CLIP_TOKENIZER = {"class_path": "vlm.data.tokenizer.CLIPTokenizer"}
GPT2 = "vlm.data.gpt2_tokenizer.CausalLMTokenizer"


def test_the_clip_tokenizer_takes_the_text_towers_length_and_the_checkpoint_records_it(tmp_path):
    task = build_task(tiny_clip_config(tokenizer=copy.deepcopy(CLIP_TOKENIZER)))  # its own default: 77
    assert task.tokenizer.context_length == task.model.text.context_length == 16
    assert task.tokenizer(["a red circle"]).shape == (1, 16)
    settings = task.inference_settings()
    assert settings["tokenizer"] == {**CLIP_TOKENIZER, "init_args": {"context_length": 16}}
    path = tmp_path / "clip.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "inference": settings}, path)
    assert load_zero_shot(path).tokenizer.context_length == 16  # 77 would be refused: longer than the tower
    shorter = build_task(tiny_clip_config(tokenizer={**CLIP_TOKENIZER, "init_args": {"context_length": 8}}))
    assert shorter.tokenizer.context_length == 8  # a shorter tokenizer is a choice, and stays


def test_language_model_and_flamingo_tokenizers_take_the_decoders_length():
    lm = build_task({"class_path": "vlm.tasks.language.LanguageModelTask", "init_args": {"model": DECODER}})
    assert lm.tokenizer.context_length == 24  # no tokenizer given: GPT-2's, at the decoder's length
    stated = {"class_path": GPT2, "init_args": {"context_length": 16}}
    lm = build_task({"class_path": "vlm.tasks.language.LanguageModelTask",
                     "init_args": {"model": DECODER, "tokenizer": stated}})
    assert lm.tokenizer.context_length == 16
    longer = {"class_path": GPT2, "init_args": {"context_length": 4096}}
    flamingo = build_task({"class_path": "vlm.tasks.captioning.FlamingoTask",
                           "init_args": {"model": FLAMINGO_MODEL, "tokenizer": longer, "attribute_words": []}})
    assert flamingo.tokenizer.context_length == 24  # capped at the decoder's
    assert flamingo.captioner().tokenizer.context_length == 24
