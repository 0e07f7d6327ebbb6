"""``vlm export``: safetensors + constructor config, loaded back with no pickle, equal outputs."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import tiny_clip_config

from vlm.cli import export_main as main
from vlm.formats import CheckpointError, build_task, load_task, task_config
from vlm.formats.export import export_task


def save_lightning_checkpoint(task, path) -> None:
    """Writes ``task`` the way ``vlm fit`` does (Trainer.save_checkpoint), without training."""
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)


@pytest.fixture
def trained_like_task():
    task = build_task(tiny_clip_config())
    with torch.no_grad():  # weights that differ from any fresh initialisation
        for p in task.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return task.eval()


def encodings(task) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 16, 16, generator=g)
    with torch.no_grad():
        text = task.tokenizer(["a red circle", "a blue square", "a green triangle"])
        return task.model.encode_image(images), task.model.encode_text(text)


def test_cli_export_and_load_back_without_pickle(tmp_path, trained_like_task, monkeypatch, capsys):
    ckpt = tmp_path / "last.ckpt"
    save_lightning_checkpoint(trained_like_task, ckpt)
    out = tmp_path / "exported"
    assert main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    # the constructor config, plus the resolved settings that let zero-shot classification load it without Lightning
    assert config.pop("inference") == json.loads(json.dumps(trained_like_task.inference_settings()))
    assert config == json.loads(json.dumps(task_config(dict(trained_like_task.hparams))))
    assert config["class_path"] == "vlm.tasks.contrastive.ContrastiveTask"
    assert config["init_args"]["model"]["init_args"]["vision"]["class_path"] == "vlm.models.vit.VisionTransformer"

    def no_unpickling(*args, **kwargs):
        raise AssertionError("loading an export must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = load_task(out)
    assert type(loaded) is type(trained_like_task) and not loaded.training
    for ours, ref in zip(encodings(loaded), encodings(trained_like_task)):
        assert torch.equal(ours, ref)
    sd, ref_sd = loaded.state_dict(), trained_like_task.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    # the checkpoint loader accepts the directory too, and an export re-exports
    assert isinstance(load_task(out), type(trained_like_task))
    assert main(["--checkpoint", str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "config.json").read_text() == (out / "config.json").read_text()


def test_load_weights_reads_task_checkpoints_and_names_families(tmp_path, trained_like_task):
    from vlm.interop import UnsupportedModelError, detect_family, load_weights

    ckpt = tmp_path / "last.ckpt"
    save_lightning_checkpoint(trained_like_task, ckpt)
    fresh = build_task(tiny_clip_config()).model.eval()
    load_weights(fresh, ckpt)  # the task's "model." prefix is removed
    assert all(torch.equal(v, trained_like_task.model.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert detect_family(fresh.state_dict()) == "vlm_clip"
    assert detect_family(fresh.vision.state_dict()) == "timm_vit"
    with pytest.raises(UnsupportedModelError, match="supported families: open_clip ViT CLIP.*timm"):
        detect_family({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)})


def test_cli_bad_input_exit_codes(tmp_path, capsys):
    # A missing or refused checkpoint is the user's to fix: exit 2, one line.
    assert main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err
    assert main(["--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(tmp_path / "junk.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_weights_that_do_not_fit_the_config_name_key_and_shapes(tmp_path, trained_like_task):
    out = export_task(trained_like_task, tmp_path / "e")
    config = json.loads((out / "config.json").read_text())
    config["init_args"]["model"]["init_args"]["embed_dim"] = 8
    (out / "config.json").write_text(json.dumps(config))
    match = r"first mismatched key 'model\.vision_proj\.weight'.*\(16, 32\).*\(8, 32\)"
    with pytest.raises(CheckpointError, match=match):
        load_task(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_task(out)
    (out / "config.json").write_text(json.dumps({"class_path": "os.system", "init_args": {}}))
    with pytest.raises(CheckpointError, match="refused config.class_path: "
                       "'os.system' is not one of vlm's buildable task classes"):
        load_task(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not a readable vlm export directory"):
        load_task(out)


@pytest.mark.filterwarnings("ignore:Attribute .model. is an instance")
def test_task_built_by_hand_cannot_be_exported(tmp_path):
    from vlm.models.clip import CLIP
    from vlm.models.text import TextTransformer
    from vlm.models.vit import VisionTransformer
    from vlm.tasks.contrastive import ContrastiveTask

    model = CLIP(VisionTransformer(16, 4, width=32, depth=1, num_heads=2),
                 TextTransformer(context_length=8, width=32, depth=1, num_heads=2), embed_dim=16)
    with pytest.raises(CheckpointError, match="build the task from a config|does not record its task class"):
        export_task(ContrastiveTask(model), tmp_path / "x")


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    """A Hugging Face GPT-2 ties its output embedding to the input one: safetensors stores the tensor once, and
    the loaded task has it tied again with the trained values."""
    transformers = pytest.importorskip("transformers")
    lm_dir = tmp_path / "tiny-gpt2"
    config = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(lm_dir)
    task = build_task({
        "class_path": "vlm.tasks.language.LanguageModelTask",
        "init_args": {"model": {"class_path": "vlm.models.hf_decoder.HFCausalLM",
                                "init_args": {"name_or_path": str(lm_dir)}}},
    })
    with torch.no_grad():
        task.model.model.get_input_embeddings().weight.add_(0.5)
    out = export_task(task, tmp_path / "e")
    loaded = load_task(out)
    emb = loaded.model.model.get_input_embeddings().weight
    assert emb.data_ptr() == loaded.model.model.get_output_embeddings().weight.data_ptr()
    assert torch.equal(emb, task.model.model.get_input_embeddings().weight)
