"""Untrusted paths and values given to ``scripts/zero_shot.py``, ``scripts/caption.py`` and ``vlm fit`` (issue #19):
nothing hangs, nothing prints a traceback, a bad input costs only its own line.

- A checkpoint, labels file or example image that is a FIFO, device, socket, too large or not UTF-8: exit 2, one
  ``error:`` line, at once.
- A FIFO, device or socket among the inputs (given, or found in a folder): its own error line, the others go on.
- A malformed ``metadata.jsonl`` (bad lines, not UTF-8, a FIFO, too large, names outside the folder) costs only its
  rows: one ``warning:`` line per file, the images are still processed.
- Out-of-range numbers, templates and prompts: exit 2, one ``error:`` line, before the checkpoint is loaded.
- Text output escapes control characters (one line per input); JSON output keeps paths exact.
- ``vlm fit --ckpt_path`` (or ``--config``) naming a corrupt file, a FIFO, a device, a directory or nothing, and a
  config a class refuses: one ``vlm: error:`` line, exit 2.

Everything that could hang on a regression runs in a subprocess with a timeout; the rest calls ``main(argv)``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_clip_config
from PIL import Image
from resume_helpers import ROOT, flamingo_task_config, subprocess_env

from vlm.data.files import TEXT_LIMIT
from vlm.inputs import expand_paths, folder_metadata, load_batches, printable

TIMEOUT = 120  # seconds: a hang fails the test instead of the suite


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_untrusted", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {"zero_shot": _script("zero_shot"), "caption": _script("caption")}


def _save(config: dict, path: Path) -> Path:
    """A checkpoint as the scripts read it (weights, config, inference settings), without training."""
    from vlm.formats import build_task

    task = build_task(config)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)  # the inference settings: the scripts then load it without Lightning
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Tiny CLIP and Flamingo checkpoints, two good images, and a FIFO, a socket and an empty folder."""
    tmp = tmp_path_factory.mktemp("untrusted")
    torch.manual_seed(0)
    paths = {"tmp": tmp, "clip": _save(tiny_clip_config(), tmp / "clip.ckpt"),
             "flamingo": _save(flamingo_task_config(), tmp / "flamingo.ckpt")}
    for name, colour in (("red", (250, 10, 10)), ("blue", (10, 10, 250))):
        Image.new("RGB", (20, 20), colour).save(tmp / f"{name}.png")
        paths[name] = tmp / f"{name}.png"
    os.mkfifo(tmp / "fifo.png")
    paths["fifo"] = tmp / "fifo.png"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp / "sock.png"))  # a socket file: opening it would fail, stat shows what it is
    paths["socket"], paths["_sock"] = tmp / "sock.png", sock
    yield paths
    sock.close()


def _run_in_process(module, capsys, *argv) -> tuple[int, str, str]:
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:  # usage errors raised in parse_args
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _start(name: str, *argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"hung: {proc.args}") from None
    return proc.returncode, out.decode(errors="surrogateescape"), err.decode(errors="surrogateescape")


def _one_error_line(code: int, out: str, err: str, fragment: str) -> None:
    """Exit 2, nothing on stdout, exactly one stderr line, ``error: ...`` naming ``fragment``."""
    assert "Traceback" not in err, err
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


# ------------------------------------------------------------------------------------------- special files
def _special(env: dict, kind: str) -> str:
    return {"fifo": str(env["fifo"]), "dev_zero": "/dev/zero", "socket": str(env["socket"])}[kind]


_KIND_WORDS = {"fifo": "FIFO", "dev_zero": "character device", "socket": "socket"}


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "socket"])
@pytest.mark.parametrize("script", ["zero_shot", "caption"])
def test_special_checkpoint_is_refused_at_once(env, script, kind):
    args = ["--labels", "red,blue"] if script == "zero_shot" else []
    start = time.monotonic()
    code, out, err = _finish(_start(script, "--checkpoint", _special(env, kind), *args, env["red"]))
    _one_error_line(code, out, err, _KIND_WORDS[kind])
    assert time.monotonic() - start < 30  # refused before torch is even imported (a hang would hit TIMEOUT)


@pytest.mark.parametrize("option", ["--labels-file", "--heldout-labels-file"])
@pytest.mark.parametrize("kind, fragment", [("fifo", "FIFO"), ("dev_zero", "character device"),
                                            ("oversize", "-byte limit"), ("latin1", "not UTF-8")])
def test_labels_files_are_read_bounded(env, tmp_path, option, kind, fragment):
    if kind == "oversize":
        path = tmp_path / "labels.txt"
        with open(path, "wb") as f:
            f.truncate(TEXT_LIMIT + 1)  # sparse: its size alone refuses it
    elif kind == "latin1":
        path = tmp_path / "labels.txt"
        path.write_bytes("caf\xe9\nthé\n".encode("latin-1"))
    else:
        path = _special(env, kind)
    labels = ["--labels", "red,blue"] if option == "--heldout-labels-file" else []
    code, out, err = _finish(_start("zero_shot", "--checkpoint", env["clip"], *labels, option, path, env["red"]))
    _one_error_line(code, out, err, fragment)


def test_labels_file_error_names_a_hostile_path_on_one_line(env, tmp_path):
    fifo = tmp_path / "lab\nels\x1b[2J.txt"
    os.mkfifo(fifo)
    code, out, err = _finish(_start("zero_shot", "--checkpoint", env["clip"], "--labels-file", fifo, env["red"]))
    _one_error_line(code, out, err, "lab\\nels\\x1b[2J.txt is a FIFO")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_special_example_image_is_a_usage_error(env, kind):
    code, out, err = _finish(_start("caption", "--checkpoint", env["flamingo"], "--example", _special(env, kind),
                                    "a red square", env["red"]))
    _one_error_line(code, out, err, _KIND_WORDS[kind])
    assert "example image" in err


@pytest.fixture(scope="module")
def special_inputs_runs(env, tmp_path_factory) -> dict:
    """Both scripts, side by side, over a good image, a FIFO, /dev/zero and a socket given directly, then a folder
    holding a good image, a FIFO named like an image and a FIFO ``metadata.jsonl``."""
    folder = tmp_path_factory.mktemp("with_fifos")
    Image.new("RGB", (20, 20), (10, 250, 10)).save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    os.mkfifo(folder / "metadata.jsonl")
    inputs = [env["red"], env["fifo"], "/dev/zero", env["socket"], folder]
    procs = {"zero_shot": _start("zero_shot", "--checkpoint", env["clip"], "--labels", "red,blue", "--json", *inputs),
             "caption": _start("caption", "--checkpoint", env["flamingo"], "--json", *inputs)}
    return {"folder": folder, **{name: _finish(proc) for name, proc in procs.items()}}


@pytest.mark.parametrize("script", ["zero_shot", "caption"])
def test_special_inputs_get_their_own_error_line(special_inputs_runs, env, script):
    code, out, err = special_inputs_runs[script]
    folder = special_inputs_runs["folder"]
    assert "Traceback" not in err, err
    assert code == 1, err
    records = [json.loads(line) for line in out.splitlines()]
    expected = [env["red"], env["fifo"], Path("/dev/zero"), env["socket"], folder / "a.png", folder / "b.png"]
    assert [r["path"] for r in records] == [str(p) for p in expected]
    good = "predictions" if script == "zero_shot" else "caption"
    assert [good in r for r in records] == [True, False, False, False, True, False], records
    for record in records:
        assert set(record) == {"path", good} or (set(record) == {"path", "error"}
                                                 and "not a regular file" in record["error"]), record
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "metadata.jsonl is a FIFO" in warnings[0], err
    assert err.splitlines()[-1] == "4 of 6 inputs failed"


def test_paths_that_cannot_be_stat_ed_get_their_own_error_line(scripts, env, capsys):
    too_long, under_a_file = "a" * 5000, f"{env['red']}/x.png"  # stat: ENAMETOOLONG, ENOTDIR
    code, out, err = _run_in_process(scripts["zero_shot"], capsys, "--checkpoint", env["clip"], "--labels",
                                     "red,blue", "--json", too_long, under_a_file, env["red"])
    assert code == 1 and "Traceback" not in err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r.get("error") for r in records] == ["cannot read (File name too long)", "cannot read (Not a directory)",
                                                 None]


# --------------------------------------------------------------------------------------------- metadata
@pytest.fixture(scope="module")
def labelled(env, tmp_path_factory) -> Path:
    """A folder of three images whose ``metadata.jsonl`` mixes good rows with every kind of bad line."""
    d = tmp_path_factory.mktemp("labelled")
    for name, colour in (("0.png", (250, 10, 10)), ("1.png", (10, 10, 250)), ("2.png", (250, 10, 10))):
        Image.new("RGB", (20, 20), colour).save(d / name)
    secret = env["tmp"] / "secret.png"  # outside the folder: rows naming it must not count
    Image.new("RGB", (20, 20), (0, 0, 0)).save(secret)
    lines = [
        json.dumps({"file_name": "0.png", "label": "red", "caption": "a red square"}),
        "{not json",  # line 2: the first bad line
        json.dumps(["a", "list"]),
        json.dumps({"file_name": 3, "label": "red"}),
        json.dumps({"file_name": "../secret.png", "label": "blue"}),
        json.dumps({"file_name": str(secret), "label": "blue"}),
        "[" * 100_000 + "]" * 100_000,  # nesting deep enough to overflow the parser's recursion
        "",
        json.dumps({"file_name": "1.png", "label": {"not": "a string"}, "caption": "a blue square"}),
        json.dumps({"file_name": "2.png", "label": "red", "caption": "a red square"}),
    ]
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def test_malformed_metadata_lines_cost_only_themselves(labelled):
    warnings: list[str] = []
    rows = folder_metadata([labelled / "0.png", labelled / "1.png"], warn=warnings.append)
    assert sorted(rows) == [labelled / "0.png", labelled / "1.png"]  # only the images asked about, none outside
    assert len(warnings) == 1 and "skipped 6 malformed lines (first: line 2: not JSON" in warnings[0], warnings


def test_zero_shot_with_malformed_metadata(scripts, env, labelled, capsys):
    code, out, err = _run_in_process(scripts["zero_shot"], capsys, "--checkpoint", env["clip"], "--labels",
                                     "red,blue", "--json", labelled)
    assert code == 0, err
    assert [Path(json.loads(line)["path"]).name for line in out.splitlines()] == ["0.png", "1.png", "2.png"]
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {labelled / 'metadata.jsonl'}: skipped 6 malformed lines (first: line 2: not "
                        "JSON (JSONDecodeError))"]
    assert "/2 labelled images)" in err  # 0.png and 2.png: 1.png's label is not a string, the rest not rows


def test_caption_with_malformed_metadata(scripts, env, labelled, capsys):
    code, out, err = _run_in_process(scripts["caption"], capsys, "--checkpoint", env["flamingo"], "--score-only",
                                     "--json", labelled)
    assert code == 0, err
    assert json.loads(out)["images"] == 3  # every row with a caption is scored, whatever its label
    assert len([line for line in err.splitlines() if line.startswith("warning: ")]) == 1


@pytest.mark.parametrize("kind", ["latin1", "oversize"])
def test_unreadable_metadata_costs_only_the_accuracy(scripts, env, tmp_path, capsys, monkeypatch, kind):
    import vlm.inputs

    Image.new("RGB", (20, 20), (250, 10, 10)).save(tmp_path / "0.png")
    meta = json.dumps({"file_name": "0.png", "label": "r\xe9d"}, ensure_ascii=False) + "\n"
    if kind == "latin1":
        (tmp_path / "metadata.jsonl").write_bytes(meta.encode("latin-1"))
    else:
        (tmp_path / "metadata.jsonl").write_text(meta, encoding="utf-8")
        monkeypatch.setattr(vlm.inputs, "METADATA_LIMIT", 10)  # rather than writing 512 MiB
    code, out, err = _run_in_process(scripts["zero_shot"], capsys, "--checkpoint", env["clip"], "--labels",
                                     "red,blue", tmp_path)
    assert code == 0 and out.startswith(f"{tmp_path / '0.png'}: ") and "accuracy" not in out + err
    assert len(err.splitlines()) == 1 and err.startswith("warning: ") and "metadata.jsonl" in err, err
    assert ("not UTF-8" if kind == "latin1" else "-byte limit") in err


def test_an_unlistable_folder_gets_one_error_line(env, tmp_path, monkeypatch):
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)  # root may list any folder: a chmod would not do
    errors: dict = {}
    paths = expand_paths([str(env["red"]), str(tmp_path)], errors)
    assert paths == [env["red"], tmp_path] and errors == {tmp_path: "cannot list folder (Permission denied)"}
    (batch,) = load_batches(paths, 8, errors)
    assert batch.ok_paths == [env["red"]] and batch.errors == errors


# ----------------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("template", ["{} and {}", "{} {x}", "{{}}{:>300000000}", "{!r}", "no field"])
def test_bad_templates_are_usage_errors_before_loading(scripts, env, capsys, template):
    start = time.process_time()  # CPU time: other work on the machine does not inflate it
    # a checkpoint that does not exist: the template must be refused before the checkpoint is looked at
    code, out, err = _run_in_process(scripts["zero_shot"], capsys, "--checkpoint", env["tmp"] / "missing.ckpt",
                                     "--labels", "red,blue", "--templates", "a {}", "--templates", template,
                                     env["red"])
    assert time.process_time() - start < 1.0  # formatting "{:>300000000}" would cost seconds and 300 MB
    _one_error_line(code, out, err, "template")


_OUT_OF_RANGE = [
    ("caption", ["--length-penalty", "1e308"], "--length-penalty"),
    ("caption", ["--length-penalty", "nan"], "--length-penalty"),
    ("caption", ["--length-penalty", "inf"], "--length-penalty"),
    ("caption", ["--length-penalty", "-10.5"], "--length-penalty"),
    ("caption", ["--max-new-tokens", str(10**9)], "--max-new-tokens"),
    ("caption", ["--max-new-tokens", "1025"], "--max-new-tokens"),
    ("caption", ["--num-beams", "65"], "--num-beams"),
    ("caption", ["--num-beams", "0"], "--num-beams"),
    ("caption", ["--batch-size", "4097"], "--batch-size"),
    ("caption", ["--prompt", "x" * 10_001], "--prompt"),
    ("caption", ["--example", "IMAGE", "y" * 10_001], "--example caption"),
    ("caption", ["--example", "IMAGE", "a"] * 33, "--example pairs"),
    ("zero_shot", ["--batch-size", "4097"], "--batch-size"),
    ("zero_shot", ["--top-k", "1001"], "--top-k"),
    ("zero_shot", ["--top-k", "0"], "--top-k"),
]


@pytest.mark.parametrize("script, extra, fragment", _OUT_OF_RANGE)
def test_out_of_range_values_are_usage_errors(scripts, env, capsys, script, extra, fragment):
    extra = [str(env["red"]) if a == "IMAGE" else a for a in extra]
    labels = ["--labels", "red,blue"] if script == "zero_shot" else []
    start = time.process_time()  # CPU time: other work on the machine does not inflate it
    code, out, err = _run_in_process(scripts[script], capsys, "--checkpoint", env["tmp"] / "missing.ckpt", *labels,
                                     *extra, env["red"])
    assert time.process_time() - start < 1.0  # refused before any model work (10**9 tokens, 10**6 beams)
    _one_error_line(code, out, err, fragment)


def test_the_bounds_themselves_are_accepted(scripts, env):
    caption = scripts["caption"].parse_args(["--checkpoint", "c", "--length-penalty", "-10", "--max-new-tokens",
                                             "1024", "--num-beams", "64", "--batch-size", "4096", "--prompt",
                                             "x" * 10_000, "p"])
    assert caption.length_penalty == -10 and caption.max_new_tokens == 1024 and caption.num_beams == 64
    zero_shot = scripts["zero_shot"].parse_args(["--checkpoint", "c", "--labels", "a", "--top-k", "1000",
                                                 "--batch-size", "4096", "p"])
    assert zero_shot.top_k == 1000 and zero_shot.batch_size == 4096


# ----------------------------------------------------------------------------------------- output escaping
@pytest.mark.parametrize("text, shown", [
    ("plain name.png", "plain name.png"),
    ("a\nb\rc\td.png", "a\\nb\\rc\\td.png"),
    ("\x1b[2J\x00\x7f", "\\x1b[2J\\x00\\x7f"),
    ("line\u2028sep\x85\u202eevil", "line\\u2028sep\\x85\\u202eevil"),  # line breaks to str.splitlines, bidi
    ("caf\udce9.png", "caf\\xe9.png"),  # os.fsdecode of a Latin-1 name
    ("thé 日本 \U0001f600 back\\slash", "thé 日本 \U0001f600 back\\slash"),
    (b"raw\xff\n", "raw\\xff\\n"),
])  # fmt: skip
def test_printable(text, shown):
    assert printable(text) == shown
    assert len(printable(text).splitlines()) == 1


@pytest.fixture(scope="module")
def hostile_names(env, tmp_path_factory) -> tuple[Path, list[Path]]:
    """A folder of images whose names hold a newline, a carriage return, a tab, an ANSI escape, a Unicode line
    separator and a byte that is not UTF-8; the empty one fails."""
    d = tmp_path_factory.mktemp("names")
    names = [b"a\nforged: red (1.000).png", b"b\rcr.png", b"c\ttab.png", b"d\x1b[31mansi.png", "e\u2028ls.png".encode(),
             b"f\xe9.png"]
    for name in names:
        Image.new("RGB", (20, 20), (250, 10, 10)).save(os.fsencode(d) + b"/" + name)
    (d / "g\nempty.png").write_bytes(b"")
    return d, sorted(d.iterdir())


def test_text_output_escapes_paths_labels_and_errors(scripts, env, hostile_names, capsys):
    folder, paths = hostile_names
    code, out, err = _run_in_process(scripts["zero_shot"], capsys, "--checkpoint", env["clip"], "--labels",
                                     "red\x1b[0m,blue", folder)
    assert code == 1 and "Traceback" not in err
    lines = out.splitlines()
    assert len(lines) == len(paths) == 7  # one line per input: no name forged or split a line
    for path, line in zip(paths, lines):
        assert line.startswith(printable(path) + ": ")
        assert line.isprintable()
    assert lines[0].startswith(f"{folder}/a\\nforged: red (1.000).png: ")
    assert lines[5].startswith(f"{folder}/f\\xe9.png: ")
    assert lines[6] == f"{folder}/g\\nempty.png: error: empty file (0 bytes)"
    assert all("red\\x1b[0m (" in line for line in lines[:6])  # a label is escaped too


def test_json_output_keeps_paths_exact(scripts, env, hostile_names, capsys):
    folder, paths = hostile_names
    code, out, _ = _run_in_process(scripts["zero_shot"], capsys, "--checkpoint", env["clip"], "--labels",
                                   "red,blue", "--json", folder)
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in paths]  # valid UTF-8 names: exactly the name
    assert [os.fsencode(r["path"]) for r in records] == [os.fsencode(p) for p in paths]  # the bytes, for all
    assert os.fsencode(records[5]["path"]).endswith(b"/f\xe9.png") and "predictions" in records[5]
    assert "\\udce9" in out.splitlines()[5]  # how JSON spells the undecodable byte


def test_caption_text_output_escapes_the_model_output(scripts, env, hostile_names, capsys, monkeypatch):
    import vlm.inference

    load = vlm.inference.load_model

    def load_with_hostile_output(path, *args):
        captioner = load(path, *args)
        captioner.generate_captions = lambda images, *args, **kwargs: ["two\nlines\x1b[2J"] * len(images)
        return captioner

    monkeypatch.setattr(vlm.inference, "load_model", load_with_hostile_output)
    folder, paths = hostile_names
    code, out, err = _run_in_process(scripts["caption"], capsys, "--checkpoint", env["flamingo"], folder)
    assert code == 1 and "Traceback" not in err
    lines = out.splitlines()
    assert len(lines) == 7 and lines[2] == f"{printable(paths[2])}: two\\nlines\\x1b[2J"
    code, out, _ = _run_in_process(scripts["caption"], capsys, "--checkpoint", env["flamingo"], "--json", paths[0])
    assert json.loads(out) == {"path": str(paths[0]), "caption": "two\nlines\x1b[2J"}  # JSON: exact


# --------------------------------------------------------------------------------------------- vlm fit
_FIT_DRIVER = r"""
import contextlib, io, json, sys, traceback
cases = json.loads(sys.stdin.read())
sys.argv = sys.argv[:1]  # main(argv) is given the arguments; LightningCLI warns when sys.argv has some too
from vlm.__main__ import main
results = {}
for name, argv in cases.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # jsonargparse's usage errors
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "raised"
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def fit_runs(env, tmp_path_factory) -> dict:
    """``vlm fit`` with each bad ``--ckpt_path`` / ``--config``, all in one subprocess (Lightning imports once)."""
    import zipfile

    tmp = tmp_path_factory.mktemp("fit")
    config = {"trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_progress_bar": False,
                          "enable_model_summary": False, "enable_checkpointing": False, "default_root_dir": str(tmp)},
              "model": tiny_clip_config(),
              "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"}}
    (tmp / "config.json").write_text(json.dumps(config))
    (tmp / "ckpt_fifo.json").write_text(json.dumps({**config, "ckpt_path": str(env["fifo"])}))
    (tmp / "random.ckpt").write_bytes(os.urandom(4096))
    whole = env["clip"].read_bytes()
    (tmp / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    with zipfile.ZipFile(tmp / "junk_inside.ckpt", "w") as z:  # a zip archive, but not torch's
        z.writestr("archive/data.pkl", b"\x80\x02garbage")
    (tmp / "folder.ckpt").mkdir()
    cfg = ["fit", "--config", str(tmp / "config.json")]
    cases = {
        "fifo": (cfg + ["--ckpt_path", str(env["fifo"])], "is a FIFO, not a regular file"),
        "dev_zero": (cfg + [f"--ckpt_path={'/dev/zero'}"], "is a character device"),
        "socket": (cfg + ["--ckpt_path", str(env["socket"])], "is a socket"),
        "random": (cfg + ["--ckpt_path", str(tmp / "random.ckpt")], "not a PyTorch checkpoint archive"),
        "truncated": (cfg + ["--ckpt_path", str(tmp / "truncated.ckpt")], "not a PyTorch checkpoint archive"),
        "junk_inside": (cfg + ["--ckpt_path", str(tmp / "junk_inside.ckpt")], "junk_inside.ckpt is not a"),
        "not_lightning": (cfg + ["--ckpt_path", str(env["clip"])], "not a Lightning training checkpoint"),
        "directory": (cfg + ["--ckpt_path", str(tmp / "folder.ckpt")], "Is a directory"),
        "missing": (cfg + ["--ckpt_path", str(tmp / "missing.ckpt")], "not found"),
        "ckpt_path_in_config": (["fit", "--config", str(tmp / "ckpt_fifo.json")], "is a FIFO"),
        "config_fifo": (["fit", "--config", str(env["fifo"])], "is a FIFO"),
        "model_fifo": (cfg + ["--model", str(env["fifo"])], "is a FIFO"),
        "refused_config": (cfg + ["--trainer.devices", "0"], "the config was refused"),
        "jsonargparse_usage": (cfg + ["--trainer.max_steps", "abc"], "trainer.max_steps"),
    }
    proc = subprocess.run([sys.executable, "-c", _FIT_DRIVER], input=json.dumps({k: v[0] for k, v in cases.items()}),
                          capture_output=True, text=True, env=subprocess_env(), cwd=tmp, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    return {name: (*results[name], fragment) for name, (_, fragment) in cases.items()}


@pytest.mark.parametrize("case", ["fifo", "dev_zero", "socket", "random", "truncated", "junk_inside", "not_lightning",
                                  "directory", "missing", "ckpt_path_in_config", "config_fifo", "model_fifo",
                                  "refused_config"])
def test_fit_refuses_bad_checkpoints_and_configs_with_one_line(fit_runs, case):
    code, err, fragment = fit_runs[case]
    assert "Traceback" not in err, err
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("vlm: error: ") and fragment in errors[0], err


def test_fit_usage_errors_are_jsonargparse_s(fit_runs):
    code, err, fragment = fit_runs["jsonargparse_usage"]
    assert code == 2 and "Traceback" not in err and fragment in err
