"""``scripts``: wall time of the user-facing scripts, start-up included, as a user runs them.

Each script runs in a fresh ``python`` process on the model of the default CPU config (exported untrained: the
weights do not change the cost) and on synthetic images. Running it on one input as well as on all of them
splits the time into start-up (interpreter, imports, checkpoint loading, one forward) and per-input work; the
bare ``import torch`` time is the floor no script can go below. Each script is also run on a copy of its export
without the inference settings, which it then loads through the task (importing Lightning): the ratio is what
loading the model alone (:func:`vlm.formats.load_zero_shot`, :func:`vlm.formats.load_captioner`) saves. Folder
throughput, decoding in worker processes against open_clip's DataLoader, is :mod:`benchmarks.folder`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.core import Row, Settings, make_row, skip_row

SUITE = "scripts"
ROOT = Path(__file__).resolve().parents[1]
LABELS = ("red circle", "blue square", "green triangle", "yellow star", "purple hexagon",
          "orange cross", "red square", "blue circle", "green star", "yellow triangle")  # fmt: skip


def wall_time(args: list[str], repeats: int) -> float:
    """Best wall time of running ``python args...`` (best, not median: start-up noise is one-sided)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:1])} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return best


def write_images(folder: Path, count: int, size: int) -> list[str]:
    """``count`` random RGB PNGs of ``size`` px, named in order."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=gen).numpy()
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def export_default(config_path: Path, out_dir: Path) -> Path:
    """Builds the task of a shipped config (untrained) and exports it as a weights directory."""
    import yaml

    from vlm.formats import build_task
    from vlm.formats.export import export_task

    config = yaml.safe_load(config_path.read_text())["model"]
    torch.manual_seed(0)
    return export_task(build_task(config), out_dir)


def checkpoint_default(config_path: Path, path: Path) -> Path:
    """Builds the task of a shipped config (untrained) and saves it as ``vlm fit`` does (a ``.ckpt``)."""
    import yaml

    from vlm.formats import build_task

    torch.manual_seed(0)
    task = build_task(yaml.safe_load(config_path.read_text())["model"])
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "inference": task.inference_settings()}, path)  # fmt: skip
    return path


@contextlib.contextmanager
def shapes_clip(settings: Settings) -> Iterator[tuple[Path, str, list[str]] | None]:
    """An untrained ``.ckpt`` of ``configs/clip/shapes.yaml``, one 64 px image and a few labels, in a temporary
    folder; None where the config does not exist."""
    config = ROOT / "configs" / "clip" / "shapes.yaml"
    if not config.exists():
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint_default(config, Path(tmp) / "clip.ckpt")
        (image,) = write_images(Path(tmp) / "images", 1, 64)
        yield ckpt, image, list(LABELS[: settings.pick(10, 3)])


def startup_rows(ckpt: Path, image: str, labels: list[str], settings: Settings) -> Iterator[Row]:
    """Cold start on one image against the floor a script cannot go below: ``import torch`` plus a ``torch.load``
    of the same file, run alternately (best of each)."""
    floor = ["-c", f"import torch; torch.load({str(ckpt)!r}, map_location='cpu', weights_only=True)"]
    runs = {
        "zero_shot.py, 1 image, cold": ["scripts/zero_shot.py", "--checkpoint", str(ckpt), *labels, "--json", image],
        "vlm.load + classify, 1 image, cold": ["-c", f"import vlm; vlm.load({str(ckpt)!r}).classify([{image!r}], "
                                                     f"{labels[1].split(',')!r})"],
    }  # fmt: skip
    best = {name: float("inf") for name in (*runs, "floor")}
    for _ in range(1 if settings.quick else settings.repeats):
        best["floor"] = min(best["floor"], wall_time(floor, 1))
        for name, args in runs.items():
            best[name] = min(best[name], wall_time(args, 1))
    for name in runs:
        yield make_row(SUITE, f"{name} vs import torch + torch.load of the file", best[name], "s", best["floor"])


def script_rows(
    label: str, script: str, ckpt: Path, extra: list[str], paths: list[str], settings: Settings
) -> Iterator[Row]:
    all_args = [script, "--checkpoint", str(ckpt), *extra, "--json", *paths]
    if settings.quick:  # the tests only check that the script runs
        yield make_row(SUITE, f"{label}, {len(paths)} images: wall time", wall_time(all_args, 1), "s")
        return
    # All images and one image, alternately, best of each: a slow spell of the machine lands on both alike.
    total = one = float("inf")
    for _ in range(settings.repeats):
        total = min(total, wall_time(all_args, 1))
        one = min(one, wall_time([script, "--checkpoint", str(ckpt), *extra, "--json", paths[0]], 1))
    yield make_row(SUITE, f"{label}, {len(paths)} images: wall time", total, "s")
    yield make_row(SUITE, f"{label}, 1 image: wall time (start-up + load + one forward)", one, "s")
    yield make_row(SUITE, f"{label}, {len(paths)} images: share that is start-up", 100 * one / total, "%")
    per_image = max(total - one, 0.0) / max(len(paths) - 1, 1)
    yield make_row(SUITE, f"{label}: time per further image", 1000 * per_image, "ms")


def loader_rows(
    script: str, export: Path, copy_dir: Path, extra: list[str], paths: list[str], settings: Settings
) -> Iterator[Row]:
    """``script`` on the export as written (loaded without Lightning) vs on a copy without its inference settings
    (loaded through the task, with Lightning, as before they existed), run alternately."""
    import json
    import shutil

    shutil.copytree(export, copy_dir)
    config = json.loads((copy_dir / "config.json").read_text())
    config.pop("inference", None)
    (copy_dir / "config.json").write_text(json.dumps(config))
    best = {"ours": float("inf"), "peer": float("inf")}
    for r in range(settings.repeats):
        for name in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
            ckpt = export if name == "ours" else copy_dir
            args = [f"scripts/{script}", "--checkpoint", str(ckpt), *extra, "--json", *paths]
            best[name] = min(best[name], wall_time(args, 1))
    name = f"{script}, {len(paths)} images: loaded without Lightning vs through the task (Lightning)"
    yield make_row(SUITE, name, best["ours"], "s", best["peer"])


def run(settings: Settings) -> Iterator[Row]:
    """The scripts' own rows; the cold start against the floor and the folder rows are the ``user`` suite's."""
    repeats = settings.repeats
    if not settings.quick:
        yield make_row(SUITE, "python -c 'import torch' (floor)", wall_time(["-c", "import torch"], repeats), "s")
        imports = wall_time(["-c", "import vlm.formats"], repeats)
        yield make_row(SUITE, "python -c 'import vlm.formats' (the scripts' loader, no Lightning)", imports, "s")
        imports = wall_time(["-c", "import vlm.tasks"], repeats)
        name = "python -c 'import vlm.tasks' (the tasks, with Lightning: what the scripts loaded before)"
        yield make_row(SUITE, name, imports, "s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_config = ROOT / "configs" / "clip" / "shapes.yaml"
        if not (ROOT / "scripts" / "zero_shot.py").exists() or not clip_config.exists():
            yield skip_row(SUITE, "scripts/zero_shot.py or configs/clip/shapes.yaml does not exist")
        else:
            ckpt = export_default(clip_config, tmp / "clip")
            paths = write_images(tmp / "images", settings.pick(100, 3), 64)
            labels = ["--labels", ",".join(LABELS[: settings.pick(10, 3)])]
            yield from script_rows(f"zero_shot.py x {len(labels[1].split(','))} labels", "scripts/zero_shot.py",
                                   ckpt, labels, paths, settings)  # fmt: skip
            yield from loader_rows("zero_shot.py", ckpt, tmp / "clip-through-task", labels, paths, settings)
        flamingo_config = ROOT / "configs" / "flamingo" / "shapes.yaml"
        if not (ROOT / "scripts" / "caption.py").exists():
            yield skip_row(SUITE, "scripts/caption.py does not exist")
            return
        try:
            ckpt = export_default(flamingo_config, tmp / "flamingo")
        except Exception as e:  # noqa: BLE001 - e.g. the config reads stage-1/2 checkpoints that are not there
            yield skip_row(SUITE, f"caption.py: cannot build the default Flamingo model ({type(e).__name__}: {e})")
            return
        paths = write_images(tmp / "images20", settings.pick(20, 2), 64)
        yield from script_rows("caption.py", "scripts/caption.py", ckpt, [], paths, settings)
        yield from loader_rows("caption.py", ckpt, tmp / "flamingo-through-task", [], paths, settings)
