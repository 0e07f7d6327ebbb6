"""What every vlm task shares: the injected optimizer and schedule, ``torch.compile`` on request, frozen parts.

A task (:class:`~vlm.tasks.contrastive.ContrastiveTask`, :class:`~vlm.tasks.language.LanguageModelTask`,
:class:`~vlm.tasks.captioning.FlamingoTask`) subclasses :class:`Task` and adds its model, loss and validation:

- ``optimizer`` / ``lr_scheduler``: callables LightningCLI builds from the config (``class_path`` /
  ``init_args``), given the parameter groups and the optimizer (:mod:`vlm.tasks.optim`); each task names its
  defaults;
- ``compile``: ``True`` or ``torch.compile``'s keyword arguments; applied once, when a Trainer sets the task up
  (:meth:`compile_parts` says what each task compiles). The weights are untouched, so checkpoints are the same
  with and without;
- :meth:`freeze_parts`: parts that do not train (Flamingo's towers, LiT's locked tower) get no gradient and stay in
  inference mode (no dropout, BatchNorm statistics fixed) whatever ``train()`` is called with;
- a checked ``load_from_checkpoint`` (:class:`~vlm.tasks.loading.CheckedLoading`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from vlm.tasks.loading import CheckedLoading
from vlm.tasks.optim import configure


class Task(CheckedLoading, L.LightningModule):
    """Base of vlm's tasks (see the module docstring). ``default_optimizer`` / ``default_lr_scheduler`` stand in
    for an optimizer or schedule the config leaves out."""

    def __init__(
        self,
        optimizer: OptimizerCallable | None,
        lr_scheduler: LRSchedulerCallable | None,
        compile: bool | dict[str, Any],
        default_optimizer: OptimizerCallable,
        default_lr_scheduler: LRSchedulerCallable,
    ) -> None:
        super().__init__()
        # Kept as attributes: under LightningCLI ``hparams`` holds only the keys the config spelled out.
        self.optimizer = optimizer or default_optimizer
        self.lr_scheduler = lr_scheduler or default_lr_scheduler
        self.compile_options = compile
        self._compiled = False
        self._frozen: list[nn.Module] = []

    # ------------------------------------------------------------------------------------------------ frozen
    def freeze_parts(self, *modules: nn.Module) -> None:
        """``modules`` stop training: no gradient, and inference mode from now on (see :meth:`train`). Not
        Lightning's ``freeze()``, which freezes the whole task for inference and is left as it is."""
        for module in modules:
            module.requires_grad_(False)
            module.eval()
            self._frozen.append(module)

    def train(self, mode: bool = True) -> Task:
        super().train(mode)
        for module in self._frozen:  # frozen parts behave as they were trained: no dropout, fixed statistics
            module.eval()
        return self

    # ------------------------------------------------------------------------------------------------ compile
    def configure_model(self) -> None:
        if self.compile_options and not self._compiled:
            self.compile_parts(self.compile_options if isinstance(self.compile_options, dict) else {})
            self._compiled = True

    def compile_parts(self, options: dict[str, Any]) -> None:
        """Compiles what the task's training runs through, with ``torch.compile``'s keyword arguments."""
        raise NotImplementedError(f"{type(self).__name__} does not support compile")

    # ---------------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict:
        return configure(self, self.optimizer, self.lr_scheduler)  # only parameters that require gradients


__all__ = ["Task"]
