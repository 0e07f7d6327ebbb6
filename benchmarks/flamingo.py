"""Flamingo measurements shared by the ``memory`` and ``generate`` suites.

The model is the one of the shipped CPU config (``configs/flamingo/shapes.yaml``), untrained: the frozen parts'
weight files are not read (their values do not change the cost).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from lightning import LightningModule

from benchmarks.core import Row, Settings, cpu_kernels, interleaved_medians, make_row, peak_memory_bytes

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flamingo" / "shapes.yaml"
CAPTIONS = ("a small red circle", "a large blue square left of a small green triangle", "a yellow star")
MIB = 2**20


@functools.cache
def _model_config() -> dict:
    import yaml

    config = yaml.safe_load(CONFIG.read_text())["model"]
    config["init_args"].update(vision_weights=None, decoder_weights=None)
    return config


def default_flamingo_task() -> LightningModule:
    """The FlamingoTask of the default CPU config, frozen parts frozen, in eval mode."""
    from vlm.formats import build_task

    torch.manual_seed(0)
    return build_task(copy.deepcopy(_model_config())).eval()


def flamingo_step(task: LightningModule, batch: int, settings: Settings | None = None,
                  loss: Callable[..., torch.Tensor] | None = None) -> Callable[[], None]:
    """One training step of ``task`` (forward, loss, backward, AdamW) on a fixed synthetic batch, on the settings'
    device and precision (the task must already be there). ``loss``: what computes it from (images, ids, labels)
    instead of ``task.compute_loss`` (e.g. a DDP-wrapped module); the step's ``optimizer`` attribute is its
    optimizer."""
    settings = settings or Settings()
    size = task.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(settings.device)
    enc = task.tokenizer.encode_batch([task.tokenizer.prompt + CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    ids, labels = enc["input_ids"].to(settings.device), enc["labels"].to(settings.device)
    optimizer = task.configure_optimizers()["optimizer"]
    compute = loss or task.compute_loss

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with settings.autocast():
            value = compute(images, ids, labels)
        value.backward()
        optimizer.step()

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def flamingo_memory_rows(suite: str, settings: Settings) -> Iterator[Row]:
    """Peak memory and time of a step with the vision tower and decoder frozen vs everything trainable."""
    batch = settings.pick(64, 4)
    steps = {}
    for trainable in (False, True):
        task = cpu_kernels(default_flamingo_task().to(settings.device).train(), settings)
        if trainable:
            task.model.vision.requires_grad_(True)
            task.model.decoder.requires_grad_(True)
        steps["trainable" if trainable else "frozen"] = step = flamingo_step(task, batch, settings)
        step()  # allocates the optimizer state, which both variants then keep
    peaks = {name: peak_memory_bytes(step, settings.device) / MIB for name, step in steps.items()}
    times = interleaved_medians(steps, repeats=min(settings.repeats, 3))
    for name, what in (("frozen", "vision + decoder frozen"), ("trainable", "everything trainable")):
        label = f"Flamingo default config step{settings.tag} (b={batch}), {what}"
        yield make_row(suite, f"{label}: peak memory", peaks[name], "MiB")
        yield make_row(suite, f"{label}: time", times[name], "s")
    saved_memory = 100 * (1 - peaks["frozen"] / peaks["trainable"])
    yield make_row(suite, "Flamingo step: memory saved by freezing", saved_memory, "%")
    saved_time = 100 * (1 - times["frozen"] / times["trainable"])
    yield make_row(suite, "Flamingo step: time saved by freezing", saved_time, "%")
