"""A file we did not write never runs code: crafted checkpoints whose unpickling would create a marker file are
refused with a clear error, and the marker never appears, on every path vlm loads checkpoints through:
``vlm.formats.load_task``, ``scripts/zero_shot.py`` and ``scripts/caption.py`` (exit 2, one error line, no
traceback), ``vlm export``, the Flamingo task's ``vision_weights`` reader, ``Task.load_from_checkpoint`` and resuming
``vlm fit --ckpt_path`` (also with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set, which makes torch unpickle anything
unless the caller insists), and an export directory whose ``config.json`` names a class outside vlm."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_clip_config
from ddp_contrastive import Pairs
from PIL import Image
from resume_helpers import ROOT, one_thread, subprocess_env

from vlm.formats import CheckpointError, build_task, load_task


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Three hostile files (a real-looking Lightning checkpoint with a payload beside the weights, one with the payload
    inside its hyper-parameters, a bare pickle) and the marker file their payload would create."""
    tmp = tmp_path_factory.mktemp("crafted")
    marker = tmp / "PWNED"
    task = build_task(tiny_clip_config())
    files = {}
    files["extra_key.ckpt"] = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                               "epoch": 0, "global_step": 0, "pytorch-lightning_version": L.__version__,
                               "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
                               "payload": Payload(marker)}
    files["in_hparams.ckpt"] = {"state_dict": task.state_dict(),
                                "hyper_parameters": {**task.hparams, "tokenizer": Payload(marker)}}
    for name, content in files.items():
        torch.save(content, tmp / name)
    (tmp / "bare.pkl").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    # The payload is live: plain unpickling does run it (so the tests below can fail).
    pickle.loads((tmp / "bare.pkl").read_bytes())
    assert marker.exists()
    marker.unlink()
    return {"dir": tmp, "marker": marker, "paths": sorted(p for p in tmp.iterdir() if p.suffix in (".ckpt", ".pkl"))}


@pytest.fixture
def no_marker(crafted):
    yield
    assert not crafted["marker"].exists(), "the crafted payload ran"


def test_load_task_refuses_crafted_files(crafted, no_marker):
    for path in crafted["paths"]:
        # A bare pickle is refused before unpickling (not a torch archive), the others by the restricted unpickler.
        with pytest.raises(CheckpointError, match="not a safe checkpoint: refused to unpickle|not a PyTorch"):
            load_task(path)


def test_load_from_checkpoint_refuses_crafted_files(crafted, no_marker):
    from vlm.tasks.captioning import FlamingoTask
    from vlm.tasks.contrastive import ContrastiveTask

    for cls in (ContrastiveTask, FlamingoTask):
        for path in crafted["paths"]:
            with pytest.raises(CheckpointError, match="not a safe checkpoint: refused to unpickle|not a PyTorch"):
                cls.load_from_checkpoint(path)


def test_pretrained_weights_reader_refuses_crafted_files(crafted, no_marker):
    from vlm.interop.weights import ConversionError, read_state_dict

    for path in crafted["paths"]:
        with pytest.raises(ConversionError, match="not a safe weights file: refused to unpickle|not a PyTorch"):
            read_state_dict(path)


def test_vlm_export_refuses_crafted_files(crafted, no_marker, tmp_path, capsys):
    from vlm.cli import export_main

    for path in crafted["paths"]:
        assert export_main(["--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("refused to unpickle" in err[0] or "not a PyTorch checkpoint" in err[0])
    assert not (tmp_path / "out").exists()


def test_export_directory_naming_a_class_outside_vlm_is_refused(tmp_path, crafted, no_marker):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(crafted["marker"])]}}))
    with pytest.raises(CheckpointError, match="refused config.class_path: "
                       "'subprocess.Popen' is not one of vlm's buildable task classes"):
        load_task(tmp_path)


@pytest.mark.parametrize("how", ["path", "last"])
def test_resuming_fit_from_a_crafted_checkpoint_is_refused(crafted, no_marker, tmp_path, monkeypatch, how):
    """``vlm fit --ckpt_path FILE`` and ``--ckpt_path last`` (a crafted ``last.ckpt`` planted in the run directory),
    with the environment variable that turns torch's ``weights_only`` default off."""
    import shutil

    from vlm.fit import UsageError, cli_main

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(crafted["dir"] / "extra_key.ckpt", tmp_path / "checkpoints" / "last.ckpt")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "vlm.callbacks.Checkpoint"}]},
        "model": tiny_clip_config(),
        # The data do not matter: the checkpoint is read before any batch.
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
    }))
    ckpt_path = "last" if how == "last" else str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(UsageError, match="refused to unpickle it"):
        cli_main(["fit", "--config", str(config), f"--ckpt_path={ckpt_path}"])


def test_scripts_refuse_crafted_checkpoints_with_one_line_and_exit_2(crafted, no_marker, tmp_path):
    """Both scripts, as real processes, side by side: exit 2, one ``error:`` line, no traceback."""
    image = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    path = crafted["dir"] / "extra_key.ckpt"
    commands = {
        "zero_shot": [sys.executable, str(ROOT / "scripts" / "zero_shot.py"), "--checkpoint", str(path),
                      "--labels", "red,blue", str(image)],
        "caption": [sys.executable, str(ROOT / "scripts" / "caption.py"), "--checkpoint", str(path), str(image)],
    }
    procs = {name: subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "refused to unpickle" in lines[0], (name, err)
        assert "Traceback" not in err and out == ""


def test_vlm_checkpoints_themselves_load_with_weights_only(tmp_path):
    """The other half of the contract: what vlm writes (callbacks' state, random state included) needs no pickle."""
    from vlm.callbacks import Checkpoint, NonFiniteGuard

    task = build_task(tiny_clip_config())
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Checkpoint(every_n_train_steps=1, save_top_k=0), NonFiniteGuard()])
    trainer.fit(task, torch.utils.data.DataLoader(Pairs(), batch_size=4))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["vlm_rng_states"]
    assert isinstance(load_task(tmp_path / "checkpoints" / "last.ckpt"), type(task))


def test_a_corrupt_safetensors_file_is_one_conversion_error(tmp_path):
    from vlm.interop.weights import ConversionError, read_state_dict

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 64)  # a header length far beyond the file
    with pytest.raises(ConversionError, match=r"model\.safetensors is not a readable safetensors file"):
        read_state_dict(bad)
