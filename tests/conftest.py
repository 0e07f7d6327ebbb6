"""Shared fixtures: tiny model configs so every test runs in seconds on a 2-core CPU, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_CLIP = {
    "class_path": "vlm.tasks.contrastive.ContrastiveTask",
    "init_args": {
        "model": {
            "class_path": "vlm.models.clip.CLIP",
            "init_args": {
                "vision": {
                    "class_path": "vlm.models.vit.VisionTransformer",
                    "init_args": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 2, "num_heads": 2},
                },
                "text": {
                    "class_path": "vlm.models.text.TextTransformer",
                    "init_args": {"context_length": 16, "width": 32, "depth": 2, "num_heads": 2},
                },
                "embed_dim": 16,
            },
        },
        "tokenizer": {"class_path": "vlm.data.tokenizer.CLIPTokenizer", "init_args": {"context_length": 16}},
        "optimizer": {"class_path": "vlm.tasks.optim.AdamW",
                      "init_args": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6}},
        "lr_scheduler": {"class_path": "vlm.tasks.optim.WarmupCosine", "init_args": {"warmup_steps": 1}},
        "templates": ["a {}"],
    },
}


TINY_FLAMINGO = {  # a Flamingo task small enough for any test
    "class_path": "vlm.tasks.captioning.FlamingoTask",
    "init_args": {
        "model": {"class_path": "vlm.models.flamingo.Flamingo", "init_args": {
            "vision": {"class_path": "vlm.models.vit.VisionTransformer",
                       "init_args": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "num_heads": 2}},
            "decoder": {"class_path": "vlm.models.decoder.DecoderLM",
                        "init_args": {"context_length": 24, "width": 16, "depth": 1, "num_heads": 2}},
            "num_latents": 2, "resampler_depth": 1, "resampler_heads": 2, "cross_attn_heads": 2}},
        "max_new_tokens": 5,
    },
}  # fmt: skip


def tiny_clip_config(warmup_steps: int | None = None, **overrides) -> dict:
    """A copy of the tiny CLIP task config with top-level ``init_args`` overridden (``warmup_steps``: the
    schedule's)."""
    cfg = copy.deepcopy(TINY_CLIP)
    cfg["init_args"].update(overrides)
    if warmup_steps is not None:
        cfg["init_args"]["lr_scheduler"]["init_args"]["warmup_steps"] = warmup_steps
    return cfg


def build_trainable(config: dict):
    """A task built from ``config`` as ``vlm fit`` builds it (jsonargparse), its ``optimizer`` and ``lr_scheduler``
    included (:func:`vlm.formats.build_task` builds tasks for inference, without them); its hyper-parameters are the
    config, as under LightningCLI."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule

    from vlm.formats.checkpoint import task_hparams_quiet, with_config

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--task", type=LightningModule)
    with task_hparams_quiet():
        task = parser.instantiate(parser.parse_object({"task": copy.deepcopy(config)})).task
    return with_config(task, config)


def write_tiny_checkpoints(folder) -> dict:
    """``clip.ckpt`` and ``flamingo.ckpt`` (its gates opened, so the image changes the caption) of the tiny configs,
    as ``vlm fit`` saves them, in ``folder``; returns ``{"clip": path, "flamingo": path}``."""
    from pathlib import Path

    from vlm.formats import build_task

    out = {}
    for name, config in (("clip", tiny_clip_config()), ("flamingo", copy.deepcopy(TINY_FLAMINGO))):
        torch.manual_seed(0)
        task = build_task(config)
        if name == "flamingo":
            with torch.no_grad():
                for blk in task.model.cross_attn:
                    blk.attn_gate.fill_(1.0)
                    blk.mlp_gate.fill_(1.0)
        ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "inference": task.inference_settings()}  # fmt: skip
        out[name] = Path(folder) / f"{name}.ckpt"
        torch.save(ckpt, out[name])
    return out


@pytest.fixture
def tiny_clip_task():
    from vlm.formats import build_task

    torch.manual_seed(0)
    return build_task(tiny_clip_config())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hf_lm_dirs(tmp_path_factory):
    """Tiny random causal LMs (GPT-2, OPT, Llama) saved with save_pretrained, each with the GPT-2 BPE tokenizer next
    to it: ``{name: directory}``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from vlm.data.gpt2_tokenizer import load_hf_tokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    tokenizer = load_hf_tokenizer(None)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
        # OPT: learned positions offset by 2, biases, a ReLU MLP; its real vocabulary is GPT-2's BPE padded to 50272.
        "opt": OPTForCausalLM(OPTConfig(vocab_size=50272, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)),
        # A vocabulary larger than the tokenizer's (padded, as OPT's and Qwen's are): new ids go after it.
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=50272, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, bos_token_id=50256, eos_token_id=50256,
                                              pad_token_id=None, initializer_range=0.3)),  # varied generations
    }
    dirs = {}
    for name, model in models.items():
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = str(path)
    return dirs
