"""Training callbacks used by the shipped configs: resumable checkpoints, the non-finite guard, CPU kernels, curves.

- :class:`Checkpoint`: ``<default_root_dir>/checkpoints/last.ckpt``, written atomically every N steps, at the end of
  training and on SIGTERM, with what Lightning leaves out for an exact resume (the random generators; the data
  order and position come from :mod:`vlm.data.resumable`). ``vlm fit --config ... --ckpt_path last`` resumes.
- :class:`NonFiniteGuard`: a NaN or infinite loss or gradient skips that optimizer step (counted and logged) or stops
  the run with the step named.
- :class:`CPUKernels`: on a CPU trainer, the model runs on :func:`vlm.kernels.use_cpu_kernels`.
- :class:`TrainingCurves`: ``curves.png`` beside the CSV logger's ``metrics.csv`` when fitting ends.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from vlm.kernels import BACKENDS, resolve_backend, use_cpu_kernels
from vlm.reliability import (
    AtomicCheckpointIO,
    NonFiniteError,
    remove_stale_temporaries,
    restore_rng,
    rng_state,
    set_rng_state,
    snapshot_rng,
)

log = logging.getLogger("vlm.callbacks")
RNG_KEY = "vlm_rng_states"  # checkpoint key: every rank's random generators, by global rank


class Checkpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that writes to ``<default_root_dir>/checkpoints`` and
    makes ``last.ckpt`` a safe point to resume from.

    Lightning's default puts checkpoints under the logger's versioned folder; vlm's contract is one fixed place per
    run directory with ``last.ckpt`` always current, so later stages, scripts and ``--ckpt_path last`` find it.
    On top of ModelCheckpoint:

    - files are replaced atomically and never with NaN/inf weights (:class:`vlm.reliability.AtomicCheckpointIO`);
    - ``last.ckpt`` is also written at the end of training (when the last step was not a multiple of
      ``every_n_train_steps``) and when a process gets SIGTERM (cluster pre-emption): at the end of the current
      step (or validation) every rank stops, ``last.ckpt`` is written and the run exits with status 143
      (128 + SIGTERM), so job scripts see that training did not finish;
    - every rank's random generators are saved and restored at the start of the resumed training, so dropout and
      augmentation continue as if never interrupted; validation during training leaves them as it found them.

    Arguments are ModelCheckpoint's, with ``save_last=True`` and ``enable_version_counter=False`` by default (a new
    run in the same directory overwrites ``last.ckpt`` instead of writing ``last-v1.ckpt`` beside it).
    """

    def __init__(self, dirpath: str | None = None, save_last: bool = True, enable_version_counter: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(dirpath=dirpath, save_last=save_last, enable_version_counter=enable_version_counter,
                         **kwargs)
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self._rng_before_validation: tuple[Any, ...] | None = None
        self._sigterm = False

    def _resolve_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # ``--ckpt_path last`` looks for last.ckpt before ``setup`` runs: resolve the directory here too.
        self._resolve_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # only Lightning's default writer is swapped
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and stage == "fit":
            remove_stale_temporaries(self.dirpath)

    # ----------------------------------------------------------------------------------------- random state
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = rng_state()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)  # every rank saves; rank 0's file holds them all
        else:
            states = [state]
        checkpoint[RNG_KEY] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get(RNG_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install_sigterm_handler()
        # Restored here, after Lightning has built the resumed data iterator (which draws from the generator),
        # so the next training step sees exactly the state the interrupted run had after the saved step.
        states, self._rng_to_restore = self._rng_to_restore, None
        if not states:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the random state of {len(states)} ranks, this run has "
                           f"{trainer.world_size}: random streams will not continue exactly")
        set_rng_state(states[trainer.global_rank % len(states)])

    # ------------------------------------------------------------------------------------------------ SIGTERM
    # Lightning 2.6's own SIGTERM handler forwards the signal and broadcasts from inside the handler, which
    # deadlocks 2-process DDP on CPU. Once training runs, this one only raises a flag; at the next step boundary
    # the ranks agree on it (one tiny all-reduce per step), all save last.ckpt together, and all stop.
    def _install_sigterm_handler(self) -> None:
        self._sigterm = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)  # Lightning's teardown puts the original back

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = True

    def _stop_if_terminated(self, trainer: L.Trainer) -> None:
        terminated = self._sigterm
        if trainer.world_size > 1:
            terminated = trainer.strategy.reduce_boolean_decision(terminated, all=False)
        if terminated:
            raise SIGTERMException(128 + signal.SIGTERM)  # on_exception below saves last.ckpt

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._stop_if_terminated(trainer)
        # Validation may follow this batch; whatever randomness it uses (building its data iterator draws a seed),
        # it hands the training stream back untouched, so a resumed run that validates at other moments (or a run
        # with another val_check_interval) continues the same stream.
        self._rng_before_validation = snapshot_rng()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and self._rng_before_validation is not None:
            restore_rng(self._rng_before_validation)  # before a checkpoint may be saved below
        super().on_validation_end(trainer, pl_module)
        if fitting:
            self._stop_if_terminated(trainer)

    # --------------------------------------------------------------------------------------- extra save points
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            # Other exceptions can stop a step half-way: such a state is not saved over a good checkpoint.
            super().on_exception(trainer, pl_module, exception)
            return
        # Raised above, at a step boundary on every rank; or by Lightning, when SIGTERM came before training began.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(f"SIGTERM: saved {self.last_model_path} at step {trainer.global_step}; "
                       "resume with --ckpt_path last")
        exception.code = 128 + signal.SIGTERM


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor's local shard), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class NonFiniteGuard(Callback):
    """Catches a NaN or infinite loss or gradient before it reaches the weights.

    The check runs after the backward pass and before the optimizer step (every micro-batch's loss, then the
    gradients' largest magnitude), agreed across ranks. With mixed-precision fp16, infinite gradients are the grad
    scaler's business (it skips those steps itself), so only the loss is checked.

    Args:
        policy: ``skip`` drops that optimizer step (gradients discarded, weights and optimizer moments untouched;
            the learning-rate schedule still advances), counts it and logs ``train/nonfinite_skipped``; ``stop``
            raises :class:`vlm.reliability.NonFiniteError` naming the step. Either way the weights that are
            checkpointed stay finite.
        max_consecutive_skips: with ``skip``, stop anyway after this many non-finite steps in a row (a diverged
            run would otherwise skip forever).
        warn_first: steps named in a warning before only the count is logged.
    """

    def __init__(self, policy: Literal["skip", "stop"] = "skip", max_consecutive_skips: int = 50,
                 warn_first: int = 5) -> None:
        if policy not in ("skip", "stop"):
            raise ValueError(f"policy must be 'skip' or 'stop', got {policy!r}")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.warn_first = warn_first
        self.skipped = 0
        self.consecutive = 0
        self._loss_bad: torch.Tensor | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # stays on the device: one sync per step, below
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        loss_bad, self._loss_bad = self._loss_bad, None
        device = pl_module.device
        flags = torch.zeros(2, device=device)
        if loss_bad is not None:
            flags[0] = loss_bad.to(device).float()
        # Under FSDP each rank checks its own shard (possibly empty) of every gradient; the ranks agree below.
        grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [g for g in grads if g.numel() > 0]
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            # The max-norm is NaN/inf exactly when some entry is; unlike the 2-norm it cannot overflow.
            largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"), error_if_nonfinite=False)
            flags[1] = (~torch.isfinite(largest)).float().to(device)
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")  # one rank's NaN is every rank's decision
        bad_loss, bad_grad = (bool(x) for x in flags.tolist())
        if not (bad_loss or bad_grad):
            self.consecutive = 0
            pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)
            return
        what = " and ".join(name for name, bad in (("loss", bad_loss), ("gradient", bad_grad)) if bad)
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite {what} at {where}; stopping (NonFiniteGuard policy 'stop'). "
                                 "The last checkpoint holds the weights from before it.")
        optimizer.zero_grad(set_to_none=True)  # the optimizer then leaves every parameter (and its moments) as is
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)
        if self.skipped <= self.warn_first:
            rank_zero_warn(f"non-finite {what} at {where}: optimizer step skipped ({self.skipped} so far)")
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteError(f"non-finite {what} at {where}: {self.consecutive} steps in a row skipped; "
                                 "stopping. The last checkpoint holds the weights from before them.")

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


class CPUKernels(Callback):
    """Switches the task's model to vlm's CPU kernels (:func:`vlm.kernels.use_cpu_kernels`) when the trainer runs on
    the CPU; on any other accelerator the model stays as it is.

    Applied in ``setup`` (every stage). Only module classes change: parameters, optimizer state, state-dict keys and
    checkpoints are those of the plain model.

    Args:
        backend: ``auto`` (oneDNN where PyTorch's MKL runs its generic path, i.e. non-Intel x86, BLAS elsewhere),
            ``onednn``, ``blas`` or ``off`` (the plain model). ``None`` (default): the environment variable
            ``VLM_CPU_LINEAR``, or ``auto`` where it is unset.
    """

    def __init__(self, backend: str | None = None) -> None:
        backend = backend if backend is not None else os.environ.get("VLM_CPU_LINEAR") or "auto"
        if backend.lower() not in BACKENDS:
            raise ValueError(f"CPUKernels backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend.lower()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(trainer.accelerator, CPUAccelerator):
            return
        use_cpu_kernels(pl_module, self.backend)
        if stage == "fit":
            rank_zero_info(f"CPU kernels: {resolve_backend(self.backend)} (asked for {self.backend!r})")


class TrainingCurves(Callback):
    """Draws the run's curves into ``curves.png`` beside the CSV logger's ``metrics.csv`` when fitting ends.

    One panel per group, each against the global step: the losses (``train/loss`` and the validation losses), the
    accuracies (``val/zero_shot_*``, ``val/attribute*``), the retrieval recalls (``val/*R@k``) and any other
    ``val/*`` metric. Written on rank zero when ``fit`` ends, also when it stops early or on an exception (the
    curves up to there). A run without a :class:`~lightning.pytorch.loggers.CSVLogger` (Lightning's default logger
    when TensorBoard is not installed) gets one warning line and no picture; a failure to draw is a logged warning,
    never an error: the curves never stop or fail a run.

    Args:
        filename: the picture's name in the logger's folder (a plain name ending in ``.png``).
    """

    def __init__(self, filename: str = "curves.png") -> None:
        if not filename.endswith(".png") or Path(filename).name != filename or filename.startswith("."):
            raise ValueError(f"filename must be a plain file name ending in .png, got {filename!r}")
        self.filename = filename

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.write(trainer)

    def write(self, trainer: L.Trainer) -> Path | None:
        """Writes the picture (rank zero only) and returns its path; ``None`` when none was written."""
        if not trainer.is_global_zero:
            return None
        logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if logger is None:
            log.warning("TrainingCurves: no curves.png, this run has no CSVLogger (trainer.logger) writing metrics.csv")
            return None
        path = Path(logger.log_dir) / self.filename
        try:
            logger.save()  # metrics.csv holds every row logged so far
            metrics = Path(logger.experiment.metrics_file_path)
            if not metrics.is_file():  # stopped before anything was logged
                log.info("TrainingCurves: nothing logged yet, no %s", path)
                return None
            plot_curves(metrics, path)
        except Exception as error:  # a picture is never worth a failed run
            log.warning("TrainingCurves: could not write %s: %s: %s", path, type(error).__name__, error)
            return None
        return path


def _panel(name: str) -> str | None:
    """The panel of a ``metrics.csv`` column, or ``None`` for a column not drawn."""
    if name == "train/loss" or (name.startswith("val/") and name.endswith("loss")):
        return "loss"
    if not name.startswith("val/"):
        return None
    if "R@" in name:
        return "retrieval recall"
    if "top" in name or "accuracy" in name:
        return "accuracy"
    return "other validation metrics"


def plot_curves(metrics_csv: Path, out: Path) -> None:
    """Draws ``train/loss`` and every ``val/*`` column of a Lightning ``metrics.csv`` against ``step`` into ``out``
    (PNG, one panel per group: see :class:`TrainingCurves`).

    Raises:
        ValueError: the file has no ``step`` column or nothing to draw.
    """
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}  # panel -> column -> (steps, values)
    for row in rows:
        if row.get("step") in (None, ""):
            continue
        for name, value in row.items():
            panel = _panel(name or "")
            if panel is None or value in (None, ""):
                continue
            steps, values = series.setdefault(panel, {}).setdefault(name, ([], []))
            steps.append(float(row["step"]))
            values.append(float(value))
    if not series:
        raise ValueError(f"{metrics_csv} has no train/loss or val/* values against a step column")
    # matplotlib here, not at import: the callbacks module stays cheap to import. Agg draws to a file, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p in ("loss", "accuracy", "retrieval recall", "other validation metrics") if p in series]
    figure = Figure(figsize=(5 * len(panels), 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for name, (steps, values) in sorted(series[panel].items()):
            axes.plot(steps, values, label=name, marker="o" if len(steps) < 30 else None, markersize=3)
        axes.set_title(panel)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(out)


__all__ = ["CPUKernels", "Checkpoint", "NonFiniteGuard", "TrainingCurves", "plot_curves"]
