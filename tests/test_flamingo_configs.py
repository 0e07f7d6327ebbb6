"""The LM and Flamingo configs parse with LightningCLI and instantiate; the Flamingo config's frozen parts match
the stages that train them (their checkpoints load into it)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/lm/shapes.yaml", "configs/flamingo/shapes.yaml", "configs/flamingo/hf_lm.yaml"]


def _config(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.mark.parametrize("path", CONFIGS)
def test_lightning_cli_parses(path, capsys):
    from vlm.fit import cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(ROOT / path), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == _config(path)["model"]["class_path"]


def _instantiate(spec: dict):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--obj", type=object)
    return parser.instantiate(parser.parse_object({"obj": spec})).obj


def test_lm_config_instantiates():
    from vlm.formats import build_task

    cfg = _config("configs/lm/shapes.yaml")
    assert cfg["trainer"]["default_root_dir"] == "runs/lm"
    task = build_task(cfg["model"])
    assert task.tokenizer.vocab_size == task.model.vocab_size == 50257
    data = _instantiate(cfg["data"])
    assert len(data.texts("validation")) == cfg["data"]["init_args"]["num_val"]


def test_flamingo_config_instantiates_and_matches_earlier_stages():
    from vlm.formats import build_task

    cfg = _config("configs/flamingo/shapes.yaml")
    assert cfg["trainer"]["default_root_dir"] == "runs/flamingo"
    args = cfg["model"]["init_args"]
    assert args["vision_weights"] == "runs/clip-scenes/checkpoints/last.ckpt"  # stage 1b (tests/test_configs.py)
    assert args["decoder_weights"] == "runs/lm/checkpoints/last.ckpt"
    task = build_task(cfg["model"])  # reads no weights: those are loaded when training starts
    assert not bool(task.pretrained_loaded)
    assert task.image_size == 64
    # The frozen decoder is the LM stage's model: its checkpoint's keys and shapes fit exactly.
    lm = build_task(_config("configs/lm/shapes.yaml")["model"])
    prefix = args["decoder_weights_prefix"]
    lm_state = {k[len(prefix):]: v.shape for k, v in lm.state_dict().items() if k.startswith(prefix)}
    assert lm_state == {k: v.shape for k, v in task.model.decoder.state_dict().items()}
    clip_path = ROOT / "configs/clip/shapes.yaml"
    if clip_path.exists():  # and the vision tower is the CLIP stage's
        clip = build_task(yaml.safe_load(clip_path.read_text())["model"])
        prefix = args["vision_weights_prefix"]
        clip_state = {k[len(prefix):]: v.shape for k, v in clip.state_dict().items() if k.startswith(prefix)}
        assert clip_state == {k: v.shape for k, v in task.model.vision.state_dict().items()}
        assert tuple(clip.image_mean) == task.image_mean and clip.image_size == task.image_size
    data = _instantiate(cfg["data"])
    assert data.source.data_dir == Path("data/shapes")
    # The closed vocabulary is the LM stage's, and spells every word of the synthetic captions.
    from vlm.data import shapes

    vocabulary = args["vocabulary"]
    assert vocabulary == _config("configs/lm/shapes.yaml")["model"]["init_args"]["vocabulary"]
    assert {"a", *shapes.COLOURS, *shapes.SHAPES, *shapes.SIZES, *" ".join(shapes.RELATIONS).split()} == set(vocabulary)


def test_hf_config_instantiates_with_a_local_decoder(tmp_path):
    """The GPU config with its hub names swapped for a tiny local Llama (no network here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.data.gpt2_tokenizer import load_hf_tokenizer
    from vlm.formats import build_task

    LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    load_hf_tokenizer(None).save_pretrained(tmp_path)
    cfg = copy.deepcopy(_config("configs/flamingo/hf_lm.yaml"))
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["trainer"]["strategy"]["class_path"] == "vlm.tasks.sharding.FSDP2Strategy"
    args = cfg["model"]["init_args"]
    decoder = args["model"]["init_args"]["decoder"]["init_args"]
    tokenizer = args["tokenizer"]["init_args"]
    assert decoder["pretrained"] and tokenizer["name_or_path"] == decoder["name_or_path"]
    decoder.update(name_or_path=str(tmp_path), pretrained=False)  # from_pretrained refuses the meta device
    tokenizer["name_or_path"] = str(tmp_path)
    args["model"]["init_args"]["cross_attn_heads"] = 4
    with torch.device("meta"):  # the ViT-L/14 tower is built for real shapes, without allocating 1.2 GB
        task = build_task(cfg["model"])
    assert task.model.vision.width == 1024 and task.image_size == 224
    assert task.tokenizer.context_length == tokenizer["context_length"] == 256  # training sequences, not 8k
    assert task.model.cross_attn_layers == [0]  # every 4th of the 4 layers
    assert task.model.resampler.num_latents == 64
    _instantiate(cfg["data"])
