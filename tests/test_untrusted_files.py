"""A checkpoint, export or config from a stranger never runs code and never exhausts the machine.

Each class of attack gets payloads built here from a tiny real checkpoint, planted in every place a file names a
class or a setting (the task, the model's parts, the ``inference`` block; ``.ckpt`` and export alike). A payload's
code would create a marker file; a module planted on ``sys.path`` creates it when imported, so "refused before the
named module is imported" is checked, not assumed. Refusals are one ``CheckpointError`` (one ``error:`` line and
exit 2 from the scripts), fast, and without the memory the payload asks for.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_FLAMINGO, tiny_clip_config
from PIL import Image

from vlm.formats import BUILDABLE, CheckpointError, build_task, export_task, load_captioner, load_task, load_zero_shot

ROOT = Path(__file__).parent.parent
EVIL_MODULE = '''
import pathlib
pathlib.Path({marker!r}).touch()  # runs on import
import torch
class Evil(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        pathlib.Path({marker!r}).touch()
import lightning
class EvilTask(lightning.LightningModule):
    def __init__(self, *args, **kwargs):
        super().__init__()
        pathlib.Path({marker!r}).touch()
def factory(*args, **kwargs) -> torch.nn.Module:
    pathlib.Path({marker!r}).touch()
    return torch.nn.Linear(1, 1)
'''


def _save(ckpt: dict, path: Path) -> Path:
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CLIP and Flamingo checkpoint (with their inference blocks) and a module whose import leaves a mark."""
    tmp = tmp_path_factory.mktemp("untrusted")
    marker = tmp / "PWNED"
    (tmp / "evil_payload.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    out = {"tmp": tmp, "marker": marker}
    for name, config in (("clip", tiny_clip_config()), ("flamingo", TINY_FLAMINGO)):
        torch.manual_seed(0)
        task = build_task(copy.deepcopy(config))
        ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "inference": task.inference_settings()}  # fmt: skip
        out[name] = _save(ckpt, tmp / f"{name}.ckpt")
        out[f"{name}_export"] = export_task(task, tmp / f"{name}_export")
    image = tmp / "red.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(image)
    out["image"] = image
    return out


@pytest.fixture
def tripwire(files, monkeypatch):
    """The planted module is importable; after the test, its marker must not exist."""
    monkeypatch.syspath_prepend(str(files["tmp"]))
    sys.modules.pop("evil_payload", None)
    yield files["marker"]
    assert "evil_payload" not in sys.modules, "the named module was imported"
    assert not files["marker"].exists(), "code from the file ran"


def _crafted(files, kind: str, edit, tmp_path: Path, form: str) -> Path:
    """A copy of the ``kind`` checkpoint (``form="ckpt"``) or export (``"export"``) changed by ``edit(config,
    settings)``, where ``config`` is the task config and ``settings`` its inference block."""
    if form == "ckpt":
        ckpt = torch.load(files[kind], weights_only=True)
        hparams = ckpt["hyper_parameters"]
        config = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
        edit(config, ckpt["inference"])
        ckpt["hyper_parameters"] = {"_class_path": config["class_path"], **config["init_args"]}
        return _save(ckpt, tmp_path / "crafted.ckpt")
    out = tmp_path / "crafted_export"
    out.mkdir()
    (out / "model.safetensors").symlink_to(files[f"{kind}_export"] / "model.safetensors")
    config = json.loads((files[f"{kind}_export"] / "config.json").read_text())
    edit(config, config["inference"])
    (out / "config.json").write_text(json.dumps(config))
    return out


def _set(path: str, value):
    """An edit that sets ``init_args`` key path ``a.b.c`` (through nested ``init_args``) of the task config."""
    def edit(config, settings):
        node = config
        *parents, last = path.split(".")
        for key in parents:
            node = node["init_args"][key]
        node["init_args"][last] = value
    return edit


def _set_setting(name: str, value):
    def edit(config, settings):
        settings[name] = value
    return edit


def _set_class(value):
    def edit(config, settings):
        config["class_path"] = value
    return edit


def _touch_config(marker: Path) -> dict:
    return {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}


def _write_shapes(marker: Path) -> dict:  # a function inside vlm that writes files
    return {"class_path": "vlm.data.commands.main", "init_args": {"argv": ["shapes", "--out", str(marker)]}}


# ------------------------------------------------------------------------------------------- code from a file
CODE_PAYLOADS = {
    "inference tokenizer: a vlm function that writes files": lambda m: _set_setting("tokenizer", _write_shapes(m)),
    "inference tokenizer: subprocess": lambda m: _set_setting("tokenizer", _touch_config(m)),
    "inference tokenizer: a planted module": lambda m: _set_setting("tokenizer", {"class_path": "evil_payload.Evil"}),
    "task class: a planted module": lambda m: _set_class("evil_payload.Evil"),
    "task class: subprocess": lambda m: _set_class("subprocess.Popen"),
    "model: a planted class": lambda m: _set("model", {"class_path": "evil_payload.Evil"}),
    "vision: a planted factory": lambda m: _set("model.vision", {"class_path": "evil_payload.factory"}),
    "vision: any installed nn.Module": lambda m: _set("model.vision", {"class_path": "torch.nn.Linear",
                                                                       "init_args": {"in_features": 1,
                                                                                     "out_features": 1}}),
    "vision: a factory that reaches for a hub": lambda m: _set("model.vision", {
        "class_path": "open_clip.create_model", "init_args": {"model_name": "ViT-B-32", "pretrained": "openai"}}),
    "vision: a vlm function": lambda m: _set("model.vision", _write_shapes(m)),
}


@pytest.mark.parametrize("form", ["ckpt", "export"])
@pytest.mark.parametrize("payload", list(CODE_PAYLOADS))
@pytest.mark.parametrize("kind", ["clip", "flamingo"])
def test_a_file_naming_code_is_refused_before_importing_it(files, tripwire, tmp_path, kind, payload, form):
    crafted = _crafted(files, kind, CODE_PAYLOADS[payload](tripwire), tmp_path, form)
    load = load_zero_shot if kind == "clip" else load_captioner
    # The inference path reads the inference block; the whole-task path (files without one) ignores it.
    for loader in (load,) if payload.startswith("inference") else (load, load_task):
        with pytest.raises(CheckpointError, match=r"refused [\w.\[\]]+: .* is not one of vlm's buildable"):
            loader(crafted)


def test_load_from_checkpoint_goes_through_the_same_checks(files, tripwire, tmp_path):
    """Lightning's ``load_from_checkpoint`` would import and call what ``_instantiator`` names; vlm's tasks don't."""
    from vlm.tasks import ContrastiveTask, FlamingoTask

    ckpt = torch.load(files["clip"], weights_only=True)
    ckpt["hyper_parameters"]["_instantiator"] = "evil_payload.factory"
    ckpt["hyper_parameters"]["model"]["init_args"]["vision"] = {"class_path": "evil_payload.Evil"}
    crafted = _save(ckpt, tmp_path / "crafted.ckpt")
    with pytest.raises(CheckpointError, match="'evil_payload.Evil' is not one of vlm's buildable"):
        ContrastiveTask.load_from_checkpoint(crafted)
    with pytest.raises(CheckpointError, match="holds a ContrastiveTask, but this needs a FlamingoTask"):
        FlamingoTask.load_from_checkpoint(files["clip"])
    task = ContrastiveTask.load_from_checkpoint(files["clip"])
    reference = torch.load(files["clip"], weights_only=True)["state_dict"]
    assert all(torch.equal(v, reference[k]) for k, v in task.state_dict().items())


@pytest.mark.parametrize("payload", [
    {"_class_path": "evil_payload.EvilTask"},
    {"model": {"class_path": "evil_payload.Evil"}},
    {"tokenizer": {"class_path": "evil_payload.Evil"}},
    {"optimizer": {"class_path": "evil_payload.Evil", "init_args": {}}},
    {"lr_scheduler": {"class_path": "evil_payload.Evil", "init_args": {}}},
    {"optimizer": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {}}},  # a scheduler, not an optimizer
])  # fmt: skip
def test_resuming_fit_refuses_a_checkpoint_whose_config_names_other_code(files, tripwire, tmp_path, payload, capsys):
    """``vlm fit`` never builds the task config a ``--ckpt_path`` records, and refuses one that names other code in
    one line, before the named module is imported."""
    from vlm.__main__ import main

    ckpt = torch.load(files["clip"], weights_only=True)
    ckpt["hyper_parameters"].update(payload)
    ckpt["pytorch-lightning_version"] = "2.5.0"
    crafted = _save(ckpt, tmp_path / "crafted.ckpt")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": tiny_clip_config(),
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
    }))
    assert main(["fit", "--config", str(config), f"--ckpt_path={crafted}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlm: error: cannot resume from --ckpt_path"), lines


def test_the_allow_list_holds_only_vlm_classes():
    import importlib

    for class_path in BUILDABLE:
        module, _, name = class_path.rpartition(".")
        assert module.startswith("vlm.")
        assert isinstance(getattr(importlib.import_module(module), name), type), f"{class_path} is not a class"


def test_unknown_arguments_and_non_plain_values_are_refused(files, tmp_path):
    crafted = _crafted(files, "clip", _set("model.vision.surprise", 1), tmp_path, "ckpt")
    with pytest.raises(CheckpointError, match=r"refused config.init_args.model.init_args.vision.init_args.surprise: "
                                              r"vlm.models.vit.VisionTransformer has no argument 'surprise'"):
        load_task(crafted)
    (tmp_path / "x").mkdir()
    crafted = _crafted(files, "clip", _set("model.text", {"class_path": "vlm.models.text.TextTransformer",
                                                          "init_args": {"width": 32}, "dict_kwargs": {"x": 1}}),
                       tmp_path / "x", "ckpt")
    with pytest.raises(CheckpointError, match="unexpected entries"):
        load_task(crafted)


def test_a_hub_name_in_a_file_is_refused(files, tmp_path):
    edit = _set_setting("tokenizer", {"class_path": "vlm.data.gpt2_tokenizer.FlamingoTokenizer",
                                      "init_args": {"name_or_path": "someone/some-model"}})
    crafted = _crafted(files, "flamingo", edit, tmp_path, "ckpt")
    with pytest.raises(CheckpointError, match="'someone/some-model' is not a local directory"):
        load_captioner(crafted)


# ---------------------------------------------------------------------------------------------- resource bombs
BOMBS = {
    "vision width 6,000": ("clip", _set("model.vision.width", 6000)),
    "vision depth 100,000": ("clip", _set("model.vision.depth", 100_000)),
    "text depth 100,000": ("clip", _set("model.text.depth", 100_000)),
    "decoder depth 100,000": ("flamingo", _set("model.decoder.depth", 100_000)),
    "model image_size 100,000": ("clip", _set("model.vision.image_size", 100_000)),
    "setting image_size 100,000": ("flamingo", _set_setting("image_size", 100_000)),
    "template with a format spec": ("clip", _set_setting("templates", ["{{}}{:>300000000}"])),
    "template with two fields": ("clip", _set_setting("templates", ["{} and {}"])),
    "template with a named field": ("clip", _set_setting("templates", ["{} {x}"])),
    "tokenizer context 10**9": ("clip", _set_setting("tokenizer", {"class_path": "vlm.data.tokenizer.CLIPTokenizer",
                                                                   "init_args": {"context_length": 10**9}})),
    "max_new_tokens 10**9": ("flamingo", _set_setting("max_new_tokens", 10**9)),
    "num_beams 10**6": ("flamingo", _set_setting("num_beams", 10**6)),
    "a list of a million labels": ("flamingo", _set_setting("attribute_words", ["x"] * 1_000_000)),
}


@pytest.mark.parametrize("form", ["ckpt", "export"])
@pytest.mark.parametrize("bomb", list(BOMBS))
def test_resource_bombs_are_refused_quickly(files, tmp_path, bomb, form):
    kind, edit = BOMBS[bomb]
    crafted = _crafted(files, kind, edit, tmp_path, form)
    load = load_zero_shot if kind == "clip" else load_captioner
    start = time.process_time()  # CPU time: a machine busy with other work does not inflate it as it does wall time
    with pytest.raises(CheckpointError, match="refused|does not match"):
        load(crafted)
    # the meta-device check and the bounds cost a fraction of a CPU second; building any of these bombs costs minutes
    assert time.process_time() - start < 5


def _peak_rss_kib(argv: list[str]) -> tuple[int, str, float, int]:
    """Runs ``argv``; returns (exit code, stderr, the child's CPU seconds, its own peak resident memory in KiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


@pytest.mark.slow
def test_scripts_refuse_bombs_with_one_line_within_time_and_memory(files, tmp_path):
    """The scripts, end to end: exit 2, one error line, no traceback, under 30 CPU seconds (start-up is a few), and no
    more memory than loading the genuine checkpoint (the bombs would need gigabytes)."""
    script = [sys.executable, "scripts/zero_shot.py", "--labels", "red,blue"]
    code, err, _, baseline = _peak_rss_kib([*script, "--checkpoint", str(files["clip"]), str(files["image"])])
    assert code == 0, err
    for i, bomb in enumerate(("vision width 6,000", "vision depth 100,000", "template with a format spec")):
        (tmp_path / str(i)).mkdir()
        crafted = _crafted(files, "clip", BOMBS[bomb][1], tmp_path / str(i), "ckpt")
        code, err, seconds, peak = _peak_rss_kib([*script, "--checkpoint", str(crafted), str(files["image"])])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        assert seconds < 30, (bomb, seconds)
        assert peak < baseline + 100 * 1024, (bomb, peak, baseline)  # within 100 MiB of a genuine load


@pytest.mark.slow
@pytest.mark.parametrize("form", ["ckpt", "export"])
def test_scripts_refuse_code_payloads_with_one_line_and_exit_2(files, tmp_path, form):
    """Both scripts, both forms: the marker never appears, even with the planted module importable."""
    env = {**os.environ, "PYTHONPATH": str(files["tmp"]), "OMP_NUM_THREADS": "1"}
    for kind, script, extra in (("clip", "scripts/zero_shot.py", ["--labels", "a,b"]),
                                ("flamingo", "scripts/caption.py", [])):  # fmt: skip
        for i, payload in enumerate(("inference tokenizer: a planted module", "vision: a planted factory")):
            where = tmp_path / f"{kind}{i}"
            where.mkdir()
            crafted = _crafted(files, kind, CODE_PAYLOADS[payload](files["marker"]), where, form)
            proc = subprocess.run([sys.executable, script, *extra, "--checkpoint", str(crafted), str(files["image"])],
                                  capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert "is not one of vlm's buildable" in lines[0]
            assert not files["marker"].exists(), f"{payload} ran code"


# ----------------------------------------------------------------------------------------------- special files
def test_special_files_are_refused_without_hanging(files, tmp_path):
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(CheckpointError, match="not a regular file"):
            load_task(path)
    export = tmp_path / "export"
    export.mkdir()
    os.mkfifo(export / "config.json")
    (export / "model.safetensors").symlink_to(files["clip_export"] / "model.safetensors")
    with pytest.raises(CheckpointError, match="FIFO, not a regular file"):
        load_zero_shot(export)
    (export / "config.json").unlink()
    (export / "config.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="character device, not a regular file"):
        load_zero_shot(export)


def test_an_oversized_export_config_is_refused(files, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").symlink_to(files["clip_export"] / "model.safetensors")
    with open(export / "config.json", "w") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB of zeros, over the 16 MiB bound
    with pytest.raises(CheckpointError, match="over the 16,777,216-byte limit"):
        load_task(export)


# ---------------------------------------------------------------------------------------------------- writes
def test_export_refuses_to_write_through_a_symlink(files, tmp_path):
    task = load_task(files["clip"])
    victim = tmp_path / "victim"
    victim.mkdir()
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(CheckpointError, match="symbolic link"):
        export_task(task, link)
    assert list(victim.iterdir()) == []
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (out / "config.json").symlink_to(target)
    with pytest.raises(CheckpointError, match="symbolic link"):
        export_task(task, out)
    assert target.read_text() == "keep me"


def test_export_is_atomic(files, tmp_path, monkeypatch):
    """A write that fails midway leaves the previous export whole and no temporary files."""
    import safetensors.torch

    task = load_task(files["clip"])
    out = export_task(task, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(OSError, match="No space left"):
        export_task(task, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_zero_shot(out).model is not None


def test_checkpoint_writes_replace_a_symlink_instead_of_writing_through_it(tmp_path):
    from vlm.reliability import atomic_torch_save

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    link = tmp_path / "last.ckpt"
    link.symlink_to(precious)
    atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, link)
    assert precious.read_text() == "keep me"
    assert not link.is_symlink() and torch.equal(torch.load(link, weights_only=True)["state_dict"]["w"], torch.ones(2))
