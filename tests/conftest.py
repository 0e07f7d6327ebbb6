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
        "lr": 1e-3,
        "warmup_steps": 1,
        "templates": ["a {}"],
    },
}


def tiny_clip_config(**overrides) -> dict:
    """A copy of the tiny CLIP task config with top-level ``init_args`` overridden."""
    cfg = copy.deepcopy(TINY_CLIP)
    cfg["init_args"].update(overrides)
    return cfg


@pytest.fixture
def tiny_clip_task():
    from vlm.formats import build_task

    torch.manual_seed(0)
    return build_task(tiny_clip_config())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
