"""The ``compile`` switch of the tasks: off by default; on, the training forward really runs through TorchDynamo
(a recording backend stands in for inductor, whose first compile takes minutes on 2 cores) with the same result,
the options reach ``torch.compile``, and checkpoints are the same with and without it."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import build_trainable, tiny_clip_config
from ddp_contrastive import Pairs, make_batch

from vlm.formats import build_task, load_task

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

TINY_LM = {
    "class_path": "vlm.tasks.language.LanguageModelTask",
    "init_args": {"model": {"class_path": "vlm.models.decoder.DecoderLM",
                            "init_args": {"context_length": 24, "width": 32, "depth": 2, "num_heads": 2}}},
}
TINY_FLAMINGO = {
    "class_path": "vlm.tasks.captioning.FlamingoTask",
    "init_args": {"model": {"class_path": "vlm.models.flamingo.Flamingo", "init_args": {
        "vision": {"class_path": "vlm.models.vit.VisionTransformer",
                   "init_args": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 2, "num_heads": 2}},
        "decoder": {"class_path": "vlm.models.decoder.DecoderLM",
                    "init_args": {"context_length": 40, "width": 32, "depth": 2, "num_heads": 2}},
        "num_latents": 4, "resampler_depth": 1, "resampler_heads": 2, "cross_attn_heads": 2}}},
}
CAPTIONS = ["a small red circle", "a large blue star above a small red cross"]


def _clip_loss(task):
    return task.training_step(dict(zip(("image", "text"), make_batch(4))), 0)


def _lm_loss(task):
    return task.training_step(task.tokenizer.encode_batch(CAPTIONS), 0)


def _flamingo_loss(task):
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return task.training_step({"image": images, "caption": CAPTIONS, **task.tokenizer.encode_batch(CAPTIONS)}, 0)


TASKS = {
    "contrastive": (tiny_clip_config(), _clip_loss),
    "language": (TINY_LM, _lm_loss),
    "flamingo": (TINY_FLAMINGO, _flamingo_loss),
}


def _build(name: str, compile):
    cfg = copy.deepcopy(TASKS[name][0])
    cfg["init_args"]["compile"] = compile
    torch.manual_seed(0)
    return build_trainable(cfg).train()  # as vlm fit builds it: a file's config never carries compile


@pytest.fixture
def recorded(monkeypatch):
    """Every ``torch.compile`` call's options, and the FX graphs TorchDynamo hands to the backend."""
    real_compile = torch.compile
    calls, graphs = [], []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # runs the captured graph as is

    def recording_compile(fn, **options):
        calls.append(options)
        return real_compile(fn, backend=backend)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", recording_compile)
    yield calls, graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(TASKS))
def test_compile_switch_runs_the_training_forward_through_dynamo(name, recorded):
    calls, graphs = recorded
    eager = _build(name, False)
    eager.configure_model()
    expected = TASKS[name][1](eager)
    assert calls == [] and graphs == []  # off by default: nothing compiled

    task = _build(name, {"mode": "max-autotune"})
    assert task.state_dict().keys() == eager.state_dict().keys()
    task.configure_model()
    task.configure_model()  # Lightning calls it again for each fit/validate/test: compiled once
    assert calls and all(options == {"mode": "max-autotune"} for options in calls)  # the options reach torch.compile
    n_calls = len(calls)
    loss = TASKS[name][1](task)
    assert graphs, "the training forward did not go through TorchDynamo"
    torch.testing.assert_close(loss, expected)
    assert len(calls) == n_calls
    # In place: the same parameter names, so either task loads the other's weights.
    assert task.state_dict().keys() == eager.state_dict().keys()
    task.load_state_dict(eager.state_dict())
    eager.load_state_dict(task.state_dict())


def test_compiled_fit_checkpoint_loads_with_and_without_compile(tmp_path, recorded):
    calls, graphs = recorded
    cfg = tiny_clip_config(compile=True, warmup_steps=0)
    torch.manual_seed(0)
    task = build_trainable(cfg)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(task, torch.utils.data.DataLoader(Pairs(), batch_size=4))
    assert calls == [{}, {}] and graphs  # Lightning called configure_model: both towers compiled, then traced
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")

    loaded = load_task(str(tmp_path / "compiled.ckpt"))  # compile is training-only: dropped when read from a file
    assert not loaded.compile_options
    eager = build_task(tiny_clip_config(warmup_steps=0)).eval()
    eager.load_state_dict(loaded.state_dict())  # strict: the same keys
    images, text = make_batch(4)
    with torch.no_grad():
        trained = task.eval().model(images, text)
        for model in (loaded.model, eager.model):
            for got, want in zip(model(images, text), trained):
                torch.testing.assert_close(got, want)
