"""``compile``: ``torch.compile`` on and off, and what compiling costs.

Our ViT-S/16 forward (inference) and the default CPU CLIP config's training step (forward, loss, backward),
eager against compiled (inductor), plus the one-off compile time, both with the default CPU kernels
(:func:`vlm.kernels.use_cpu_kernels`) applied. The CLIP step is compiled by the task's own
switch (``compile: true`` in the config), so the figure is the one a user gets. ``torch.compile`` stays off by
default unless the speed-up repays the compile time within a run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.core import Row, Settings, clear_grads, cpu_kernels, interleaved_medians, make_row

SUITE = "compile"
CLIP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip" / "shapes.yaml"


def _compare(label: str, eager: Callable[[], object], compiled: Callable[[], object], settings: Settings,
             items: int, unit: str) -> Iterator[Row]:  # fmt: skip
    start = time.perf_counter()
    compiled()  # first call compiles
    compile_s = time.perf_counter() - start
    t = interleaved_medians({"eager": eager, "compiled": compiled}, repeats=settings.repeats)
    yield make_row(SUITE, f"{label}, eager", items / t["eager"], unit)
    yield make_row(SUITE, f"{label}, torch.compile", items / t["compiled"], unit)
    yield make_row(SUITE, f"{label}: torch.compile speed-up", t["eager"] / t["compiled"], "x")
    yield make_row(SUITE, f"{label}: compile time (first call)", compile_s, "s")
    saved = t["eager"] - t["compiled"]
    if saved > 0:
        yield make_row(SUITE, f"{label}: calls to repay the compile time", compile_s / saved, "calls")


def _compile(model: torch.nn.Module, settings: Settings) -> Callable[..., object]:
    # --quick (the tests) checks the plumbing only: inductor's first compile takes minutes on 2 cores.
    return torch.compile(model, backend="eager" if settings.quick else "inductor")


def vit_rows(settings: Settings) -> Iterator[Row]:
    from vlm.models.vit import VisionTransformer

    torch.manual_seed(0)
    size = settings.pick(dict(width=384, depth=12, num_heads=6), dict(width=64, depth=2, num_heads=2))
    side = settings.pick(224, 32)
    vit = cpu_kernels(VisionTransformer(image_size=side, patch_size=settings.pick(16, 8), **size).eval(), settings)
    compiled = _compile(vit, settings)
    batch = settings.pick(8, 2)
    images = torch.randn(batch, 3, side, side)

    def run(model: torch.nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return model(images)

        return call

    label = settings.pick("ViT-S/16 224px forward (b=8)", "tiny ViT forward (b=2)")
    yield from _compare(label, run(vit), run(compiled), settings, batch, "img/s")
    with torch.no_grad():
        diff = (compiled(images) - vit(images)).abs().max().item()
    yield make_row(SUITE, f"{label}: max |compiled - eager|", diff, "abs diff")


def clip_rows(settings: Settings) -> Iterator[Row]:
    import yaml

    from vlm.formats import build_task

    torch.manual_seed(0)
    config = yaml.safe_load(CLIP_CONFIG.read_text())["model"]
    task = cpu_kernels(build_task(copy.deepcopy(config)).train(), settings)
    switched = copy.deepcopy(config)  # the same task with the switch on, the same weights
    switched.setdefault("init_args", {})["compile"] = {"backend": "eager"} if settings.quick else True
    compiled_task = cpu_kernels(build_task(switched).train(), settings)
    compiled_task.load_state_dict(task.state_dict())
    compiled_task.configure_model()  # what the Trainer calls when training starts
    batch = settings.pick(128, 4)
    size = task.image_size
    images = torch.randn(batch, 3, size, size)
    text = task.tokenizer(["a small red circle left of a large blue square"] * batch)

    def step(which: torch.nn.Module) -> Callable[[], None]:
        def call() -> None:
            clear_grads(which)
            which.compute_loss(images, text).backward()

        return call

    label = f"default CPU CLIP config fwd+loss+bwd (b={batch})"
    yield from _compare(label, step(task), step(compiled_task), settings, batch, "img/s")


def run(settings: Settings) -> Iterator[Row]:
    yield from vit_rows(settings)
    yield from clip_rows(settings)
