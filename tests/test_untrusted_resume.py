"""A stranger's file, second round: what ``vlm fit --ckpt_path`` takes from a checkpoint, and bounds that shape-only
tricks cannot get round.

- ``--ckpt_path`` resumes weights and loop state, never configuration: a file's ``compile`` options (which would
  reach TorchInductor, whose options name a compiler command) and a ``class_path`` anywhere in its hyper-parameters
  are never used; a file whose weights do not fit the run's model is one line before anything is loaded.
- Reading any checkpoint: shared references count against one budget (a small pickle cannot make the walk run for
  ever), tensors must be whole, dense, contiguous CPU tensors (a stride-0 tensor describes any shape over one stored
  value), zip members must be stored as ``torch.save`` writes them (no inflating bombs), pseudo-files are refused.
- Exports: no training-only paths carried, a 5,000-digit number or an escape sequence in ``config.json`` is one
  escaped error line, decoding defaults are bounded by their work and need a stop token.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_FLAMINGO, build_trainable, tiny_clip_config
from ddp_contrastive import Pairs
from PIL import Image

from vlm.formats import CheckpointError, build_task, export_task, load_captioner, load_task, load_zero_shot
from vlm.formats.checkpoint import read_checkpoint

ROOT = Path(__file__).parent.parent


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A genuine training checkpoint of the tiny CLIP after 2 steps (optimizer and loop state included), and a
    ``vlm fit`` config over the same task whose run is already finished at step 2 (nothing but restoring runs)."""
    tmp = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    task = build_trainable(tiny_clip_config())
    from vlm.callbacks import Checkpoint

    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp / "first",
                        callbacks=[Checkpoint(every_n_train_steps=1, save_top_k=0)])  # fmt: skip
    trainer.fit(task, torch.utils.data.DataLoader(Pairs(), batch_size=4))
    ckpt = torch.load(tmp / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    return {"tmp": tmp, "ckpt": ckpt}


def _fit_config(tmp: Path, model: dict | None = None) -> Path:
    config = tmp / "config.json"
    config.write_text(json.dumps({
        "trainer": {"accelerator": "cpu", "max_steps": 2, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp / "run"), "num_sanity_val_steps": 0,
                    "limit_val_batches": 0, "callbacks": [{"class_path": "vlm.callbacks.Checkpoint"}]},
        "model": model or tiny_clip_config(),
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
    }))
    return config


def _record_fitted_tasks(monkeypatch) -> list:
    """The tasks ``Trainer.fit`` is called with (the run's own, as built from its config)."""
    fitted, fit = [], L.Trainer.fit

    @functools.wraps(fit)  # LightningCLI reads fit's signature for the subcommand's arguments
    def recording_fit(self, model, *args, **kwargs):
        fitted.append(model)
        return fit(self, model, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    return fitted


def _resume(trained, tmp_path, hparams_update=None, replace_hparams=None, model=None, capsys=None):
    from vlm.__main__ import main

    ckpt = copy.deepcopy(trained["ckpt"])
    if replace_hparams is not None:
        ckpt["hyper_parameters"] = replace_hparams
    ckpt["hyper_parameters"].update(hparams_update or {})
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    return main(["fit", "--config", str(_fit_config(tmp_path, model)), f"--ckpt_path={path}"])


def test_compile_options_in_a_checkpoint_never_reach_torch_compile(trained, tmp_path, monkeypatch, capsys):
    """The shell-command attack: Inductor options naming a compiler. The run resumes and nothing is compiled."""
    marker = tmp_path / "RAN"
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        raise AssertionError("torch.compile was called")

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: spy(**k))
    payload = {"compile": {"options": {"cpp.cxx": [f"sh -c 'touch {marker}' x", "g++"]}, "backend": "inductor"}}
    fitted = _record_fitted_tasks(monkeypatch)
    assert _resume(trained, tmp_path, payload) == 0, capsys.readouterr().err
    assert calls == [] and not marker.exists()
    assert len(fitted) == 1 and not fitted[0].compile_options and fitted[0].trainer.global_step == 2


def test_a_class_path_in_plain_hyper_parameters_is_never_imported(trained, tmp_path, monkeypatch, capsys):
    """Hyper-parameters without ``_class_path`` were merged as plain values, and jsonargparse imported a
    ``class_path`` among them; now nothing of them is merged."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_resume_payload.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                                     "class X:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hparams = {"model": {"class_path": "evil_resume_payload.X"}, "tokenizer": {"class_path": "evil_resume_payload.X"}}
    assert _resume(trained, tmp_path, replace_hparams=hparams) == 0, capsys.readouterr().err
    assert "evil_resume_payload" not in sys.modules and not marker.exists()


def test_a_config_difference_is_one_line_of_notice_and_the_run_keeps_its_own(trained, tmp_path, monkeypatch,
                                                                             capsys):
    fitted = _record_fitted_tasks(monkeypatch)
    assert _resume(trained, tmp_path, {"templates": ["a photo of {}", "\x1b[2J{}"]}) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("vlm: note:")]
    assert len(notes) == 1 and "init_args.templates" in notes[0] and "\x1b" not in notes[0], err
    assert len(fitted) == 1 and fitted[0].templates == tiny_clip_config()["init_args"]["templates"]


def test_weights_that_do_not_fit_the_run_are_one_line_before_loading(trained, tmp_path, capsys):
    """A width the run's model does not have: refused from the file's shapes (memory-mapped), not by allocating."""
    ckpt = copy.deepcopy(trained["ckpt"])
    name = next(k for k, v in ckpt["state_dict"].items() if v.ndim == 2)
    ckpt["state_dict"][name] = torch.zeros(3, 5)
    path = tmp_path / "wide.ckpt"
    torch.save(ckpt, path)
    from vlm.__main__ import main

    assert main(["fit", "--config", str(_fit_config(tmp_path)), f"--ckpt_path={path}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlm: error: cannot resume from --ckpt_path") and name in lines[0]


# ------------------------------------------------------------------------------------------- reading bounds
@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("genuine")
    torch.manual_seed(0)
    task = build_task(tiny_clip_config())
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
            "inference": task.inference_settings()}  # fmt: skip
    torch.save(ckpt, tmp / "clip.ckpt")
    image = tmp / "red.png"
    Image.new("RGB", (16, 16), (220, 0, 0)).save(image)
    return {"tmp": tmp, "ckpt": ckpt, "path": tmp / "clip.ckpt", "image": image}


def _variant(genuine, tmp_path, change) -> Path:
    ckpt = copy.deepcopy(genuine["ckpt"])
    change(ckpt)
    path = tmp_path / "variant.ckpt"
    torch.save(ckpt, path)
    return path


def test_shared_references_count_against_one_budget(genuine, tmp_path):
    """One list referenced 65,536 times on each of four levels: a few hundred KB of pickle, 65,536**4 visits."""
    nested: list = [0]
    for _ in range(4):
        nested = [nested] * 65536
    path = _variant(genuine, tmp_path, lambda c: c["hyper_parameters"].update(extra=nested))
    assert path.stat().st_size - genuine["path"].stat().st_size < 4 << 20
    with pytest.raises(CheckpointError, match="shared references count each time"):
        read_checkpoint(path)
    from vlm.formats.build import check_plain

    with pytest.raises(CheckpointError, match="shared references count each time"):
        check_plain({"a": nested}, "x")


@pytest.mark.parametrize("kind", ["stride0", "overlap", "sparse", "meta", "quantized"])
def test_only_whole_dense_tensors_are_read(genuine, tmp_path, kind):
    name = next(k for k, v in genuine["ckpt"]["state_dict"].items() if v.ndim == 2)

    def change(c):
        shape = c["state_dict"][name].shape
        if kind == "stride0":  # one stored value, 4096 x 4096 described
            c["state_dict"][name] = torch.zeros(1).expand(4096, 4096)
        elif kind == "overlap":  # views that share one stored block, each claiming it all
            block = torch.zeros(shape.numel())
            c["state_dict"][name] = block.view(shape)
            c["state_dict"]["extra"] = [block[1:].view(-1) for _ in range(50)]
        elif kind == "sparse":
            c["state_dict"][name] = torch.zeros(shape).to_sparse()
        elif kind == "meta":
            c["state_dict"][name] = torch.empty(shape, device="meta")
        else:
            c["state_dict"][name] = torch.quantize_per_tensor(torch.zeros(shape), 0.1, 0, torch.qint8)

    path = _variant(genuine, tmp_path, change)
    match = {"overlap": "views that overlap",  # a quantized storage cannot even be described without its data
             "quantized": f"refused tensor state_dict.{name}|is not a readable checkpoint"}.get(
        kind, f"refused tensor state_dict.{name}")
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


def test_contiguous_views_that_share_a_storage_without_overlap_are_read(genuine, tmp_path):
    """As a sharded optimizer writes its state: slices of one flat block, each its own part."""
    def change(c):
        flat = torch.arange(12.0)
        c["extra"] = {"a": flat[:4], "b": flat[4:], "tied": flat[:4]}

    assert read_checkpoint(_variant(genuine, tmp_path, change))["extra"]["b"].tolist() == [float(i) for i in
                                                                                          range(4, 12)]


def _rezip(path: Path, out: Path, deflate: str) -> Path:
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            method = zipfile.ZIP_DEFLATED if info.filename.endswith(deflate) else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info), compress_type=method)
    return out


def test_compressed_archive_members_are_refused_before_reading(genuine, tmp_path):
    """torch.save stores members as they are; a deflated data.pkl could inflate megabytes into gigabytes."""
    path = _rezip(genuine["path"], tmp_path / "zipped.ckpt", "data.pkl")
    with pytest.raises(CheckpointError, match="refused archive member .*data.pkl.*compressed"):
        read_checkpoint(path)


def test_kernel_pseudo_files_are_refused_wherever_a_path_is_read(genuine, tmp_path):
    from vlm.data.files import UnsafeFileError, check_regular, read_bounded

    for path in ("/proc/self/pagemap", "/proc/self/status", "/sys/kernel/mm/transparent_hugepage/enabled"):
        if not os.path.exists(path):
            continue
        with pytest.raises(UnsafeFileError, match="kernel pseudo-file"):
            check_regular(path, "file")
        with pytest.raises(UnsafeFileError, match="kernel pseudo-file"):
            read_bounded(path, "file")
    link = tmp_path / "pagemap.ckpt"
    link.symlink_to("/proc/self/pagemap")
    with pytest.raises(CheckpointError, match="kernel pseudo-file"):
        read_checkpoint(link)
    export = export_task(build_task(tiny_clip_config()), tmp_path / "export")
    (export / "model.safetensors").unlink()
    (export / "model.safetensors").symlink_to("/proc/self/pagemap")
    with pytest.raises(CheckpointError, match="kernel pseudo-file"):
        load_zero_shot(export)
    assert check_regular(tmp_path, "folder", directory_ok=True) == tmp_path  # an ordinary folder still passes


def test_the_scripts_refuse_a_stride_zero_checkpoint_with_one_line(genuine, tmp_path):
    name = next(k for k, v in genuine["ckpt"]["state_dict"].items() if v.ndim == 2)
    path = _variant(genuine, tmp_path, lambda c: c["state_dict"].update({name: torch.zeros(1).expand(8192, 8192)}))
    runs = {
        "zero_shot": [sys.executable, str(ROOT / "scripts" / "zero_shot.py"), "--checkpoint", str(path), "--labels",
                      "red,blue", str(genuine["image"])],
        "export": [sys.executable, "-m", "vlm", "export", "--checkpoint", str(path), "--out", str(tmp_path / "x")],
    }
    for what, command in runs.items():
        proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "refused tensor" in lines[0], (what, proc.stderr)
        assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ exports
def test_exports_carry_no_training_only_paths_or_compile_options(tmp_path):
    config = copy.deepcopy(TINY_FLAMINGO)
    config["init_args"].update(vision_weights=str(tmp_path / "home" / "me" / "clip.ckpt"),
                               decoder_weights=str(tmp_path / "home" / "me" / "lm.ckpt"), compile={"mode": "default"})
    task = build_task(config)
    assert not task.compile_options  # dropped by name when built from a file's config
    out = export_task(task, tmp_path / "export")
    text = (out / "config.json").read_text()
    init_args = json.loads(text)["init_args"]
    assert not {"vision_weights", "decoder_weights", "compile"} & set(init_args)
    assert str(tmp_path) not in text


def test_a_huge_number_or_an_escape_sequence_in_config_json_is_one_escaped_line(genuine, tmp_path):
    export = export_task(build_task(tiny_clip_config()), tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    cases = {
        "digits": (export / "config.json").read_text().replace('"class_path"', '"n": ' + "9" * 5000 + ', "class_path"',
                                                               1),
        "escape": json.dumps({**config, "init_args": {**config["init_args"], "\x1b[2J\nwrote /etc/passwd": 1}}),
    }
    for name, text in cases.items():
        (export / "config.json").write_text(text)
        proc = subprocess.run([sys.executable, "-m", "vlm", "export", "--checkpoint", str(export), "--out",
                               str(tmp_path / f"out-{name}")], env=_env(), capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("vlm export: error:"), (name,
                                                                                                      proc.stderr)
        assert "\x1b" not in proc.stderr and proc.stdout == "" and "Traceback" not in proc.stderr


def _captioner_export(tmp_path, **inference) -> Path:
    torch.manual_seed(0)
    out = export_task(build_task(copy.deepcopy(TINY_FLAMINGO)), tmp_path / "flamingo")
    config = json.loads((out / "config.json").read_text())
    config["inference"].update(inference)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_decoding_defaults_are_bounded_by_their_work(tmp_path):
    """Each setting within its own bound, but 64 beams x 4,096 tokens together: refused at load."""
    with pytest.raises(CheckpointError, match="num_beams 64 x max_new_tokens 4096"):
        load_captioner(_captioner_export(tmp_path, num_beams=64, max_new_tokens=4096))
    load_captioner(_captioner_export(tmp_path / "ok", num_beams=3, max_new_tokens=20))  # a real default loads


def test_a_restricted_vocabulary_must_keep_a_stop_token(tmp_path):
    reference = load_captioner(_captioner_export(tmp_path / "ref"))
    tok = reference.tokenizer
    stops = {tok.end_of_chunk_token_id, tok.eos_token_id}
    allowed = [i for i in range(reference.model.vocab_size) if i not in stops]
    with pytest.raises(CheckpointError, match="holds no stop token"):
        load_captioner(_captioner_export(tmp_path, vocab_ids=allowed))
    kept = sorted([*allowed, tok.end_of_chunk_token_id])
    assert load_captioner(_captioner_export(tmp_path / "kept", vocab_ids=kept)).vocab_ids == kept


def test_a_genuine_checkpoint_still_loads(genuine):
    model = load_zero_shot(genuine["path"])
    assert model is not None and load_task(genuine["path"]) is not None
    buffer = io.BytesIO()
    torch.save(genuine["ckpt"], buffer)
    assert buffer.tell() > 0
