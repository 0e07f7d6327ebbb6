"""Checkpoints written before the tasks took an injected optimizer and schedule and a tokenizer config (their
hyper-parameters hold lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio, the language model's image settings,
a tokenizer named by a string and a task context_length) still load for inference, through every loader, with the
same outputs; resuming training from one stops with one line naming what changed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_CLIP

from vlm.data.gpt2_tokenizer import load_hf_tokenizer
from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlm.formats import build_task, load_captioner, load_task, load_zero_shot
from vlm.tasks import ContrastiveTask, LanguageModelTask

MEAN, STD = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
FORMER_OPTIMIZER = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6, "warmup_steps": 1,
                    "min_lr_ratio": 0.0}
LIGHTNING = {"_instantiator": "lightning.pytorch.cli.instantiate_module"}
DECODER = {"class_path": "vlm.models.decoder.DecoderLM",
           "init_args": {"context_length": 24, "width": 32, "depth": 2, "num_heads": 2}}
FLAMINGO_MODEL = {"class_path": "vlm.models.flamingo.Flamingo", "init_args": {
    "vision": {"class_path": "vlm.models.vit.VisionTransformer",
               "init_args": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "num_heads": 2}},
    "decoder": DECODER, "num_latents": 4, "resampler_depth": 1, "resampler_heads": 2, "cross_attn_heads": 2}}


def _old_clip_hparams() -> dict:
    """A ContrastiveTask's hyper-parameters as LightningCLI saved them then: every argument, the optimizer's values
    among them."""
    return {"_class_path": "vlm.tasks.contrastive.ContrastiveTask",
            "model": copy.deepcopy(TINY_CLIP["init_args"]["model"]),
            "tokenizer": {"class_path": "vlm.data.tokenizer.CLIPTokenizer", "init_args": {"context_length": 16}},
            "loss": "clip", **FORMER_OPTIMIZER, "lock_image": False, "lock_image_unlocked_blocks": 0,
            "lock_text": False, "templates": ["a {}"], "image_mean": MEAN, "image_std": STD,
            "accumulate_micro_batches": 1, "compile": False, "same_caption_positive": False,
            "cache_locked_text": False, "init_weights": None, "init_weights_prefix": "model.", **LIGHTNING}


def _old_lm_hparams() -> dict:
    """A LanguageModelTask's: the tokenizer a name (None: GPT-2's BPE), a context_length, unused image settings."""
    return {"_class_path": "vlm.tasks.language.LanguageModelTask", "model": copy.deepcopy(DECODER), "tokenizer": None,
            "context_length": 16, "vocabulary": None, **FORMER_OPTIMIZER, "betas": [0.9, 0.95], "eps": 1e-8,
            "image_size": 224, "image_mean": MEAN, "image_std": STD, "compile": False, **LIGHTNING}


def _old_flamingo_hparams(tokenizer_dir: str) -> dict:
    return {"_class_path": "vlm.tasks.captioning.FlamingoTask", "model": copy.deepcopy(FLAMINGO_MODEL),
            "vision_weights": None, "vision_weights_prefix": "model.visual.", "decoder_weights": None,
            "decoder_weights_prefix": "model.", "tokenizer": tokenizer_dir, "prompt": "", "context_length": 20,
            "vocabulary": None, "images_per_sequence": 1, "input_noise": 0.0, **FORMER_OPTIMIZER,
            "max_new_tokens": 4, "num_beams": 1, "attribute_words": [], "image_size": None, "image_mean": MEAN,
            "image_std": STD, "compile": False, **LIGHTNING}


EARLIER_KEYS = {"model.text.pos_embed": "model.text.positional_embedding",  # a CLIP's text tower
                "model.pos_embed.weight": "model.position_embedding.weight",  # a language model's decoder
                "model.decoder.pos_embed.weight": "model.decoder.position_embedding.weight"}  # a Flamingo's


def _earlier_names(weights: dict) -> dict:
    """A task's weights as an earlier vlm named them: a CLIP's image tower ``visual``, its projection
    ``visual_proj``, its text tower's position embedding ``positional_embedding``; a decoder's (a language model's,
    a Flamingo's) ``position_embedding``."""
    renamed = {"model.vision.": "model.visual.", "model.vision_proj.": "model.visual_proj."}
    clip = "model.vision_proj.weight" in weights  # a Flamingo's tower was always vision

    def earlier(k: str) -> str:
        if k in EARLIER_KEYS:
            return EARLIER_KEYS[k]
        return next((old + k[len(new):] for new, old in renamed.items() if clip and k.startswith(new)), k)

    return {earlier(k): v for k, v in weights.items()}


def _saved_names(path) -> set[str]:
    return set(torch.load(path, weights_only=True)["state_dict"])


def _save_old(task, hparams: dict, path) -> str:
    """A checkpoint of ``task``'s weights with the former ``hparams`` (and no inference block: the loaders then
    rebuild the whole task from them), its weights under their earlier names."""
    torch.save({"state_dict": _earlier_names(task.state_dict()), "hyper_parameters": hparams, "epoch": 0,
                "global_step": 1, "pytorch-lightning_version": "2.5.0", "optimizer_states": [], "lr_schedulers": []},
               path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    load_hf_tokenizer(None).save_pretrained(path)
    return str(path)


def test_an_old_clip_checkpoint_loads_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    reference = build_task(copy.deepcopy(TINY_CLIP)).eval()
    path = _save_old(reference, _old_clip_hparams(), tmp_path / "old.ckpt")
    images, text = torch.randn(2, 3, 16, 16), reference.tokenizer(["a red circle", "a blue square"])
    for task in (load_task(path), ContrastiveTask.load_from_checkpoint(path)):
        assert "lr" not in task.hparams and task.tokenizer.context_length == 16
        with torch.no_grad():
            for got, want in zip(task.model(images, text), reference.model(images, text)):
                assert torch.equal(got, want)
    zero_shot = load_zero_shot(path)
    assert zero_shot.templates == ["a {}"] and list(zero_shot.image_mean) == MEAN
    assert torch.equal(zero_shot.tokenizer(["a red circle"]), reference.tokenizer(["a red circle"]))
    saved = _saved_names(path)
    assert any(k.startswith("model.visual.") for k in saved) and "model.text.positional_embedding" in saved
    assert not any("pos_embed" in k for k in saved - {"model.visual.pos_embed"})


def test_earlier_clip_weight_names_resume_and_feed_a_flamingo_and_interop(tmp_path):
    """CLIP's tower was ``visual`` / ``visual_proj``; it is ``vision`` / ``vision_proj``. A file with the earlier
    names resumes (the weight check and the state dict Lightning loads both see today's names), gives a Flamingo its
    tower under the earlier prefix or today's, and loads into a CLIP through vlm.interop as a bare state dict."""
    from vlm.formats.resume import check_resume_weights
    from vlm.interop import load_weights
    from vlm.interop.parts import read_part

    torch.manual_seed(0)
    source = build_task(copy.deepcopy(TINY_CLIP))
    path = tmp_path / "earlier.ckpt"
    torch.save({"state_dict": _earlier_names(source.state_dict()), "hyper_parameters": dict(source.hparams),
                "epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.5.0"}, path)
    torch.manual_seed(1)
    fresh = build_task(copy.deepcopy(TINY_CLIP))
    check_resume_weights(fresh, path)  # names and shapes against today's task: no refusal
    ckpt = torch.load(path, weights_only=True)
    fresh.on_load_checkpoint(ckpt)  # what Lightning calls before it loads the state dict
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), source.state_dict().values()))
    vision = build_task(copy.deepcopy(TINY_CLIP)).model.vision  # a Flamingo's tower of the same architecture
    for prefix in ("model.visual.", "model.vision."):
        part = read_part(path, prefix, vision, "vision")
        assert part.keys() == vision.state_dict().keys()
        assert all(torch.equal(v, source.model.vision.state_dict()[k]) for k, v in part.items())
    bare = {k[len("model."):]: v for k, v in _earlier_names(source.state_dict()).items()}
    assert "visual_proj.weight" in bare and "text.positional_embedding" in bare
    clip = load_weights(build_task(copy.deepcopy(TINY_CLIP)).model, bare)
    assert torch.equal(clip.vision_proj.weight, source.model.vision_proj.weight)
    assert torch.equal(clip.text.pos_embed, source.model.text.pos_embed)


def test_an_old_language_model_checkpoint_keeps_its_context_length(tmp_path):
    torch.manual_seed(0)
    tokenizer = {"class_path": "vlm.data.gpt2_tokenizer.CausalLMTokenizer", "init_args": {"context_length": 16}}
    reference = build_task({"class_path": "vlm.tasks.language.LanguageModelTask",
                            "init_args": {"model": copy.deepcopy(DECODER), "tokenizer": tokenizer}}).eval()
    path = _save_old(reference, _old_lm_hparams(), tmp_path / "old.ckpt")
    assert "model.position_embedding.weight" in _saved_names(path)
    task = LanguageModelTask.load_from_checkpoint(path)
    assert task.tokenizer.context_length == 16 < task.model.context_length  # the former task's context_length
    assert not hasattr(task, "image_size")
    text = ["a small red circle left of a large blue square above a small green star below a large red cross"]
    batch = task.tokenizer.encode_batch(text)
    assert batch["input_ids"].shape[1] == 16 and torch.equal(batch["input_ids"],
                                                              reference.tokenizer.encode_batch(text)["input_ids"])
    with torch.no_grad():
        assert torch.equal(task.compute_loss(batch["input_ids"], batch["labels"]),
                           reference.compute_loss(batch["input_ids"], batch["labels"]))


def test_an_old_flamingo_checkpoint_captions_the_same(tmp_path, gpt2_dir):
    torch.manual_seed(0)
    tokenizer = {"class_path": "vlm.data.gpt2_tokenizer.CausalLMTokenizer",
                 "init_args": {"name_or_path": gpt2_dir, "context_length": 20}}
    reference = build_task({"class_path": "vlm.tasks.captioning.FlamingoTask", "init_args": {
        "model": copy.deepcopy(FLAMINGO_MODEL), "tokenizer": tokenizer, "max_new_tokens": 4,
        "attribute_words": []}}).eval()
    path = _save_old(reference, _old_flamingo_hparams(gpt2_dir), tmp_path / "old.ckpt")
    saved = _saved_names(path)
    assert "model.decoder.position_embedding.weight" in saved and "model.decoder.pos_embed.weight" not in saved
    captioner = load_captioner(path)
    assert captioner.tokenizer.name_or_path == gpt2_dir and captioner.tokenizer.context_length == 20
    images = torch.randn(2, 3, 16, 16)
    assert captioner.generate_captions(images) == reference.captioner().generate_captions(images)
    task = load_task(path)
    assert task.tokenizer.context_length == 20 and task.optimizer is not None  # the defaults stand in


def test_earlier_decoder_weight_names_resume_and_feed_a_flamingo(tmp_path):
    """A decoder's position embedding was ``position_embedding``; it is ``pos_embed``. A language model's file with
    the earlier name resumes (the weight check and the state dict Lightning loads both see today's names), and it
    and a bare DecoderLM state dict with the earlier name give a Flamingo its decoder."""
    from vlm.formats.resume import check_resume_weights
    from vlm.interop.parts import read_part

    lm = {"class_path": "vlm.tasks.language.LanguageModelTask", "init_args": {"model": copy.deepcopy(DECODER)}}
    torch.manual_seed(0)
    source = build_task(copy.deepcopy(lm))
    path = tmp_path / "earlier.ckpt"
    torch.save({"state_dict": _earlier_names(source.state_dict()), "hyper_parameters": dict(source.hparams),
                "epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.5.0"}, path)
    assert "model.position_embedding.weight" in _saved_names(path)
    torch.manual_seed(1)
    fresh = build_task(copy.deepcopy(lm))
    check_resume_weights(fresh, path)  # names and shapes against today's task: no refusal
    ckpt = torch.load(path, weights_only=True)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert fresh.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), source.state_dict().values()))
    bare = tmp_path / "decoder.pt"
    torch.save({k[len("model."):]: v for k, v in _earlier_names(source.state_dict()).items()}, bare)
    decoder = build_task(copy.deepcopy(lm)).model  # a Flamingo's decoder of the same architecture
    for file, prefix in ((path, "model."), (bare, "")):
        part = read_part(file, prefix, decoder, "decoder")
        assert part.keys() == decoder.state_dict().keys()
        assert torch.equal(part["pos_embed.weight"], source.model.pos_embed.weight)


def test_only_vlm_names_of_earlier_files_are_renamed():
    """Exact names at their places only: a Hugging Face model that a task wraps keeps its own
    ``embeddings.position_embedding`` (and open_clip's ``positional_embedding`` stays for its converter)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from vlm.formats.checkpoint import current_weight_name, current_weight_names

    hf = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1)).state_dict()
    assert any(k.endswith("embeddings.position_embedding.weight") for k in hf)  # text_model. or not, by version

    def under(prefix: str, extra: dict | None = None) -> dict:
        return {**{prefix + k: v for k, v in hf.items()}, **(extra or {})}

    proj = torch.zeros(4, 16)
    for weights in (under("model.text.model.", {"model.text_proj.weight": proj}), under("model.model."),  # tasks
                    under("model.decoder.model."), under("text.model.", {"text_proj.weight": proj}), hf):  # bare
        assert current_weight_names(weights) is weights, next(iter(weights))
    open_clip = {"positional_embedding": 0, "token_embedding.weight": 0, "transformer.resblocks.0.ln_1.weight": 0,
                 "text.positional_embedding": 0, "text.token_embedding.weight": 0, "text_projection": 0}
    assert current_weight_names(open_clip) is open_clip
    decoder = {"position_embedding.weight": 0, "token_embedding.weight": 0}  # no vlm blocks: not known to be vlm's
    assert current_weight_names(decoder) is decoder
    assert set(current_weight_names({**decoder, "blocks.0.norm1.weight": 0})) == {
        "pos_embed.weight", "token_embedding.weight", "blocks.0.norm1.weight"}
    for key in ("model.text.positional_embedding.weight", "model.blocks.0.position_embedding.weight",
                "model.text.model.positional_embedding", "model.decoder.position_embedding.bias",
                "text.model.embeddings.position_embedding.weight"):
        assert current_weight_name(key, bare=True) == key
    assert current_weight_name("model.decoder.position_embedding.weight") == "model.decoder.pos_embed.weight"


def test_a_hub_name_as_an_old_tokenizer_is_still_refused(tmp_path):
    """The former string tokenizer becomes a tokenizer config whose name_or_path gets the local-directory check."""
    from vlm.formats import CheckpointError

    torch.manual_seed(0)
    reference = build_task({"class_path": "vlm.tasks.language.LanguageModelTask",
                            "init_args": {"model": copy.deepcopy(DECODER)}})
    path = _save_old(reference, {**_old_lm_hparams(), "tokenizer": "someone/some-model"}, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="'someone/some-model' is not a local directory"):
        load_task(path)


def test_resuming_from_an_old_checkpoint_is_one_error_line(tmp_path, capsys):
    from conftest import tiny_clip_config

    from vlm.__main__ import main

    torch.manual_seed(0)
    path = _save_old(build_task(copy.deepcopy(TINY_CLIP)), _old_clip_hparams(), tmp_path / "old.ckpt")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "trainer": {"accelerator": "cpu", "max_steps": 2, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": tiny_clip_config(),
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
    }))
    assert main(["fit", "--config", str(config), f"--ckpt_path={path}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"vlm: error: cannot resume from --ckpt_path {path}: it was written by an earlier vlm")
    assert "ContrastiveTask took lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio" in lines[0]
    assert "optimizer / lr_scheduler" in lines[0]
