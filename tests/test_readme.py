"""The README cannot rot: every command and Python snippet in it runs, in its order, in a scratch folder.

The `vlm fit` commands run as written plus overrides that make them tiny (2 steps, a few hundred generated images),
so the checkpoints the later commands and snippets read are the ones the earlier commands wrote. `DIR` (the
own-data placeholder) is a small folder from `scripts/make_polygons.py`. `make` lines are left out (`make test` is
this suite; `make demo` is the full-size run of the same commands).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
TINY = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1"]  # fmt: skip
SHAPES_SIZE = ["--data.init_args.source.init_args.num_train", "256", "--data.init_args.source.init_args.num_val", "36"]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def commands() -> list[list[str]]:
    """The README's shell commands in order (continuation lines joined, comments dropped), without `make`."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith(("make ", "#")):
                out.append(shlex.split(line))
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", tmp / "configs")
    shutil.copytree(ROOT / "scripts", tmp / "scripts")
    (tmp / ".venv" / "bin").mkdir(parents=True)
    for name in ("python", "vlm"):  # the README's .venv/bin/... paths: this interpreter and its vlm command
        target = sys.executable if name == "python" else str(Path(sys.executable).parent / "vlm")
        wrapper = tmp / ".venv" / "bin" / name
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(target)} "$@"\n')
        wrapper.chmod(0o755)
    result = _run([sys.executable, "scripts/make_polygons.py", "--out", "DIR", "--train", "256", "--val", "48"], tmp)
    assert result.returncode == 0, result.stderr
    return tmp


def test_the_readme_has_the_commands_a_newcomer_needs():
    text = " ".join(" ".join(c).replace(".venv/bin/", "") for c in commands())
    for needed in ("configs/clip/shapes.yaml", "configs/lm/shapes.yaml", "configs/flamingo/shapes.yaml",
                   "configs/clip/imagefolder.yaml", "configs/lm/imagefolder.yaml", "configs/flamingo/imagefolder.yaml",
                   "scripts/zero_shot.py", "scripts/caption.py", "vlm explain", "vlm index", "vlm search"):  # fmt: skip
        assert needed in text
    assert len(README.read_text().splitlines()) < 200
    assert blocks("python"), "the README shows the Python API"
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", README.read_text()):
        assert (ROOT / image).is_file(), f"the README shows {image}, which does not exist"


@pytest.mark.slow
def test_every_readme_command_and_snippet_runs(scratch):
    for argv in commands():
        if argv[0].endswith("vlm") and argv[1] == "fit":
            shapes = any("shapes" in a for a in argv)
            argv = argv + TINY + (SHAPES_SIZE if shapes and "configs/lm/shapes.yaml" not in argv else [])
            if "configs/flamingo/imagefolder.yaml" in argv or "configs/flamingo/shapes.yaml" in argv:
                argv += ["--data.init_args.batch_size", "16"]
        result = _run(argv, scratch)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    for code in blocks("python"):
        result = _run([sys.executable, "-c", code], scratch)
        assert result.returncode == 0, f"{code}\n{result.stderr[-3000:]}"
        assert result.stdout.strip(), "the snippet prints its result"
