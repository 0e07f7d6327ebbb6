"""LightningModules: each owns a loss, its optimizer, freezing and logging around a pure model."""

from vlm.tasks.captioning import FlamingoTask
from vlm.tasks.contrastive import ContrastiveTask
from vlm.tasks.language import LanguageModelTask

__all__ = ["ContrastiveTask", "FlamingoTask", "LanguageModelTask"]
