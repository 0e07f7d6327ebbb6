"""Outputs and the page stay in their folders: ``vlm explain`` writes only inside ``--out`` whatever its inputs are
named, and ``vlm serve --index`` shows only images under the folder given with ``--images``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import write_tiny_checkpoints
from PIL import Image

import vlm
from vlm.__main__ import main
from vlm.data.scenes import two_object_scene
from vlm.data.shapes import make_sample
from vlm.explain.render import OutputPathError, inside, output_name
from vlm.index import _write_index, build_index, load_index
from vlm.serve import Demo

LABELS = ["red circle", "blue square", "green star", "yellow cross"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("confine")
    out = write_tiny_checkpoints(tmp)
    out["scene"] = two_object_scene(0, 0, 32)[0]
    gallery, secret = tmp / "gallery", tmp / "secret"
    gallery.mkdir()
    secret.mkdir()
    for i in range(3):
        make_sample(0, "validation", i, image_size=32)[0].save(gallery / f"{i}.png")
        make_sample(0, "validation", i, image_size=32)[0].save(secret / f"{i}.png")
    out["gallery"], out["secret"] = gallery, secret
    out["index"] = tmp / "gallery.index"
    build_index(out["clip"], gallery, out["index"], progress=False)
    return out


# ------------------------------------------------------------------------------------------------ vlm explain
def _explain(files, out, *paths) -> tuple[int, list[dict]]:
    return main(["explain", "--checkpoint", str(files["clip"]), "--labels", "red circle,blue square", "--json",
                 "--out", str(out), *map(str, paths)])


def _records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_an_image_named_dotdot_png_is_written_inside_out(files, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    files["scene"].save(inputs / "..png", format="PNG")  # its stem is "..": out/.. + ".png" would be out's parent
    out = tmp_path / "maps"
    code = _explain(files, out, inputs / "..png")
    (record,) = _records(capsys)
    assert code == 0 and "error" not in record
    assert sorted(os.listdir(tmp_path)) == ["in", "maps"]  # nothing beside the output folder (no maps.png)
    assert sorted(os.listdir(out)) == ["image.json", "image.png"]
    assert Path(record["png"]) == out / "image.png" and Path(record["json"]) == out / "image.json"
    assert json.loads((out / "image.json").read_text())["path"] == str(inputs / "..png")


def test_out_dot_writes_into_the_current_folder(files, tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    files["scene"].save(inputs / "..png", format="PNG")
    files["scene"].save(inputs / "scene.png")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = _explain(files, ".", inputs / "..png", inputs / "scene.png")
    records = _records(capsys)
    assert code == 0 and [r["png"] for r in records] == ["image.png", "scene.png"]
    assert sorted(os.listdir(work)) == ["image.json", "image.png", "scene.json", "scene.png"]
    assert sorted(os.listdir(tmp_path)) == ["in", "work"]


def test_hostile_and_colliding_names_each_get_their_own_file_inside_out(files, tmp_path, capsys):
    inputs, other = tmp_path / "in", tmp_path / "other"
    inputs.mkdir()
    other.mkdir()
    names = ["...png", ".hidden.png", "a\\b.png", "line\nbreak.png", "x.tar.png", "x.png", "X.png"]
    paths = [inputs / n for n in names] + [other / "x.png"]
    for p in paths:
        files["scene"].save(p, format="PNG")
    out = tmp_path / "maps"
    code = _explain(files, out, *paths)
    records = _records(capsys)
    assert code == 0 and [r["path"] for r in records] == list(map(str, paths))
    written = [Path(r["png"]) for r in records]
    assert all(p.parent == out and p.exists() and not p.name.startswith(".") for p in written)
    assert len({p.name.casefold() for p in written}) == len(paths)  # no two inputs share an output
    assert sorted(os.listdir(tmp_path)) == ["in", "maps", "other"]
    assert len(os.listdir(out)) == 2 * len(paths)  # a PNG and a JSON each, no temporary file left


def test_a_symbolic_link_in_out_is_replaced_not_followed(files, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "maps"
    out.mkdir()
    (out / "scene.png").symlink_to(victim)
    (out / "scene.json").symlink_to(victim)
    files["scene"].save(tmp_path / "scene.png")
    assert _explain(files, out, tmp_path / "scene.png") == 0
    assert victim.read_text() == "keep me"
    assert not (out / "scene.png").is_symlink() and Image.open(out / "scene.png").format == "PNG"
    assert json.loads((out / "scene.json").read_text())["path"] == str(tmp_path / "scene.png")


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../x.png"])
def test_inside_refuses_names_that_leave_the_folder(tmp_path, name):
    with pytest.raises(OutputPathError):
        inside(tmp_path, name)


def test_output_names_are_plain_distinct_and_short():
    taken: set[str] = set()
    names = [output_name(p, taken) for p in ["..png", "...png", "a/.b.png", "c\\d.png", "é" * 300 + ".png", "x.png",
                                             "X.png"]]
    assert names[:4] == ["image", "image_2", "b", "c_d"]
    assert len(names[4].encode()) <= 200 and names[5:] == ["x", "X_2"]


# ------------------------------------------------------------------------------------------------ vlm serve
@pytest.fixture(scope="module")
def stranger(files, tmp_path_factory) -> Path:
    """An index with the right fingerprint that names another folder than the one it was built from."""
    index = load_index(files["index"])
    path = tmp_path_factory.mktemp("stranger") / "stranger.index"
    _write_index(dataclasses.replace(index, root=files["secret"]), path)
    return path


def _serve(files, *args) -> list[str]:
    return ["serve", "--clip", str(files["clip"]), "--labels", ",".join(LABELS), *map(str, args)]


def test_serve_refuses_an_index_without_images_in_one_line(files, capsys):
    code = main(_serve(files, "--index", files["index"]))
    err = capsys.readouterr().err
    assert code == 2 and "--images" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_serve_refuses_an_index_of_another_folder_at_start(files, stranger, capsys):
    code = main(_serve(files, "--index", stranger, "--images", files["gallery"]))
    err = capsys.readouterr().err
    assert code == 2 and str(files["secret"]) in err and "not under --images" in err
    assert len(err.strip().splitlines()) == 1


def test_search_results_outside_images_are_dropped_with_a_line(files, stranger, capsys):
    clip = vlm.load(files["clip"])
    found, said = Demo(clip, index=load_index(stranger), labels=LABELS, images=files["gallery"]).search("a circle")
    assert found == [] and "0 result(s)" in said
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all("dropped" in line and str(files["secret"]) in line for line in err)
    found, _ = Demo(clip, index=load_index(files["index"]), labels=LABELS, images=files["gallery"]).search("a circle")
    assert len(found) == 3 and capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def linked(files, tmp_path_factory) -> dict:
    """A gallery of two images, one of them a symbolic link to a file outside it, and its index."""
    tmp = tmp_path_factory.mktemp("linked")
    gallery = tmp / "gallery"
    gallery.mkdir()
    make_sample(0, "validation", 0, image_size=32)[0].save(gallery / "0.png")
    (gallery / "1.png").symlink_to(files["secret"] / "1.png")
    build_index(files["clip"], gallery, tmp / "g.index", progress=False)
    assert load_index(tmp / "g.index").files == ["0.png", "1.png"]
    return {"gallery": gallery, "index": tmp / "g.index"}


def test_a_symbolic_link_out_of_images_is_dropped(files, linked, capsys):
    demo = Demo(vlm.load(files["clip"]), index=load_index(linked["index"]), labels=LABELS, images=linked["gallery"])
    found, _ = demo.search("a circle")
    assert [name.split(" ")[1] for _, name in found] == ["0.png"]
    assert "dropped" in capsys.readouterr().err


def test_the_page_shows_only_images_under_images(files, linked, tmp_path):
    """The page started as a user would (``vlm serve ... --index --images``), queried through its own API."""
    from gradio_client import Client
    from test_serve import _free_port, _wait

    port = _free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    args = _serve(files, "--index", linked["index"], "--images", linked["gallery"], "--port", port)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vlm", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}/"
            assert _wait(lambda: _answers(url, proc), 120), log_path.read_text()[-2000:]
            found, said = Client(url, verbose=False).predict("a circle", api_name="/search")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert "2 result(s)" not in said and len(found) == 1 and found[0]["caption"].endswith(" 0.png")
    dropped = [line for line in log_path.read_text().splitlines() if "dropped" in line]
    assert len(dropped) == 1 and str(linked["gallery"] / "1.png") in dropped[0]


def _answers(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        pytest.fail(f"vlm serve exited with {proc.returncode}")
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        time.sleep(0.5)
        return False
