"""LightningModules around a pure model: freezing, logging and an injected optimizer and schedule; the losses and
metrics they call live in :mod:`vlm.losses` and :mod:`vlm.metrics`."""

from vlm.tasks.captioning import FlamingoTask
from vlm.tasks.contrastive import ContrastiveTask
from vlm.tasks.language import LanguageModelTask

__all__ = ["ContrastiveTask", "FlamingoTask", "LanguageModelTask"]
