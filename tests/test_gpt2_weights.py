"""Hugging Face GPT-2 checkpoints (save_pretrained directories and their weights files) as Flamingo's decoder weights:
converted into vlm's DecoderLM, whose logits then equal transformers' GPT2LMHeadModel on the same tokens."""

from __future__ import annotations

import copy
import os
import pickle
import zipfile

import pytest
import torch
from conftest import TINY_FLAMINGO, assert_fp32_close, build_trainable

from vlm.interop.weights import WeightsSourceError

GPT2 = dict(vocab_size=50257, n_positions=24, n_embd=32, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT2LMHeadModel saved three ways: safetensors, pytorch_model.bin (its tied lm_head.weight
    included), sharded safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2, initializer_range=0.2)).eval()  # large weights: logits far apart
    root = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(root / "safetensors")
    # transformers 5 writes safetensors only; older versions wrote pytorch_model.bin, a torch state-dict file.
    model.config.save_pretrained(root / "bin")
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    model.save_pretrained(root / "sharded", max_shard_size="2MB")
    return model, root


def _config(decoder_weights: str, **decoder) -> dict:
    cfg = copy.deepcopy(TINY_FLAMINGO)
    args = {"vocab_size": 50257, "context_length": 24, "width": 32, "depth": 2, "num_heads": 2, **decoder}
    cfg["init_args"]["model"]["init_args"]["decoder"]["init_args"] = args
    cfg["init_args"]["decoder_weights"] = decoder_weights
    return cfg


def _sources(root):
    return {
        "directory": root / "safetensors",
        "weights file": root / "safetensors" / "model.safetensors",
        "pytorch_model.bin directory": root / "bin",
        "pytorch_model.bin file": root / "bin" / "pytorch_model.bin",
        "sharded directory": root / "sharded",
    }


@pytest.mark.parametrize("kind", ["directory", "weights file", "pytorch_model.bin directory",
                                  "pytorch_model.bin file", "sharded directory"])
def test_flamingo_decoder_loads_hf_gpt2_and_matches_its_logits(gpt2, kind):
    model, root = gpt2
    source = _sources(root)[kind]
    if kind == "sharded directory":
        assert (source / "model.safetensors.index.json").is_file()  # really sharded
    task = build_trainable(_config(str(source)))
    ids = torch.randint(0, 50257, (2, 11))
    with torch.no_grad():
        expected, exact = model(ids).logits, copy.deepcopy(model).double()(ids).logits
        before = task.model.decoder(ids)
        task.setup("fit")  # where training reads the frozen parts' weights
        assert bool(task.pretrained_loaded)
        assert not torch.allclose(before, expected, atol=1e-2)
        assert_fp32_close(task.model.decoder(ids), expected, exact, msg="decoder")  # as HF's float32 is
        images = torch.randn(2, 3, 16, 16)  # the gates start closed: the Flamingo is exactly GPT-2 on text tokens
        assert_fp32_close(task.model(images, ids)[..., :50257], expected, exact, msg="Flamingo")


def test_a_step_trains_only_the_bridge_on_loaded_gpt2(gpt2):
    model, root = gpt2
    task = build_trainable(_config(str(root / "safetensors")))
    task.setup("fit")
    decoder = copy.deepcopy(task.model.decoder.state_dict())
    batch = {"image": torch.randn(2, 3, 16, 16), **task.tokenizer.encode_batch(["a red circle", "a blue square"])}
    task.train()
    opt = task.configure_optimizers()["optimizer"]
    bridge = [p for p in task.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in bridge]
    loss = task.training_step(batch, 0)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(v, task.model.decoder.state_dict()[k]) for k, v in decoder.items())
    assert any(not torch.equal(b, p) for b, p in zip(before, bridge))


@pytest.mark.parametrize(("decoder", "message"), [
    ({"num_heads": 4}, "n_head=2 but the decoder's num_heads gives 4"),
    ({"act": "gelu"}, "activation_function='gelu_new' but the decoder's act gives 'gelu'"),
    ({"norm_eps": 1e-6}, "layer_norm_epsilon"),
    ({"width": 16, "num_heads": 2}, "token_embedding.weight"),
])  # fmt: skip
def test_a_decoder_unlike_the_gpt2_checkpoint_is_refused_in_one_line(gpt2, decoder, message):
    _, root = gpt2
    task = build_trainable(_config(str(root / "safetensors"), **decoder))
    with pytest.raises(WeightsSourceError) as e:
        task.setup("fit")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not bool(task.pretrained_loaded)


def test_a_directory_of_another_architecture_points_to_hfcausallm(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             max_position_embeddings=32, word_embed_proj_dim=16)).save_pretrained(tmp_path)
    task = build_trainable(_config(str(tmp_path)))
    with pytest.raises(WeightsSourceError, match="'opt' model, not GPT-2: use it as the decoder with "
                                                  "vlm.models.hf_decoder.HFCausalLM"):
        task.setup("fit")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_runs_code_is_refused_and_never_run(gpt2, tmp_path, monkeypatch):
    """A GPT-2 directory whose pytorch_model.bin carries a code-running pickle: refused by weights-only loading."""
    _, root = gpt2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((root / "bin" / "config.json").read_bytes())
    with zipfile.ZipFile(bad / "pytorch_model.bin", "w") as z:  # torch's zip layout, a hostile data.pkl inside
        z.writestr("archive/data.pkl", pickle.dumps({"transformer.wte.weight": _Payload()}))
        z.writestr("archive/version", "3\n")
    monkeypatch.chdir(tmp_path)
    task = build_trainable(_config(str(bad)))
    with pytest.raises(WeightsSourceError, match="not a safe weights file: refused to unpickle"):
        task.setup("fit")
    assert not (tmp_path / "PWNED").exists()
