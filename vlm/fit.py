"""``vlm fit|validate|test|predict``: LightningCLI over the tasks in ``vlm.tasks``, beside the other commands
(:mod:`vlm.cli`, :mod:`vlm.serve`); the checks of a ``--ckpt_path`` file live in :mod:`vlm.formats.resume`.

User errors on the Lightning path are one ``vlm: error:`` line and exit status 2, not a traceback: a FIFO, device
or socket named on the command line (jsonargparse would block reading it as a config), a ``--ckpt_path`` that is
missing, not a regular file or directory, or not a readable checkpoint (random bytes, a truncated archive), and a
config whose classes refuse their arguments. jsonargparse prints its own usage errors and exits 2.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# --ckpt_path values Lightning resolves itself (to a file that is then checked when it is loaded)
_CKPT_KEYWORDS = ("last", "best", "hpc")


class UsageError(ValueError):
    """A command line or config that is the user's to fix; :func:`fit_main` prints it as one line and returns 2."""


_USER_ERROR = "_vlm_user_error"  # set on a library exception that is the user's to fix: the one line to print


def _mark_user_error(error: BaseException, message: str) -> None:
    """Marks ``error`` as the user's to fix, with the line to print; it keeps its type (callers of :func:`cli_main`
    may rely on it) and its traceback."""
    setattr(error, _USER_ERROR, message)


def _summary(error: BaseException, limit: int = 300) -> str:
    """What a (long, multi-line) loading error says is wrong, on one line of at most ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    unsupported = [line for line in lines if "Unsupported" in line]  # torch's weights_only refusal names the global
    text = unsupported[0] if unsupported else " ".join(lines) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refuse_special_files(argv: Sequence[str]) -> None:
    """Refuses a FIFO, device or socket among the command-line values.

    jsonargparse reads a value naming an existing file as a config (``--config``, ``--model``, ``--data``, ...): a
    FIFO would block it forever and ``/dev/zero`` would never end. Nothing is opened here, only ``stat``-ed.

    Raises:
        UsageError: naming the value and what it is.
    """
    from vlm.data.files import UnsafeFileError, check_regular

    for token in argv:
        if token in SUBCOMMANDS:
            continue
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        if not value or (value.startswith("-") and value == token):  # an option name
            continue
        try:
            mode = os.stat(value).st_mode
        except (OSError, ValueError):  # not a path (most values), or an unreadable one: jsonargparse says so
            continue
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            continue
        try:
            check_regular(value, "command-line file")
        except UnsafeFileError as e:
            raise UsageError(str(e)) from None


def _as_usage_error(check: Any, *args: Any) -> Any:
    """``check(*args)``, a :class:`~vlm.formats.CheckpointError` it raises turned into a :class:`UsageError`."""
    from vlm.formats import CheckpointError

    try:
        return check(*args)
    except CheckpointError as e:
        raise UsageError(str(e)) from None


def _guard_strategy(strategy: Any) -> None:
    """Wraps the strategy's checkpoint loading: the file is checked first, a loaded object that is not a Lightning
    checkpoint is refused, and what loading it or its weights raises is marked as a user error."""
    from vlm.formats.resume import check_checkpoint_file, check_resume_weights

    load, load_weights = strategy.load_checkpoint, strategy.load_model_state_dict

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        _as_usage_error(check_checkpoint_file, checkpoint_path)  # also the file that "last" or "hpc" resolved to
        if isinstance(checkpoint_path, str | os.PathLike) and Path(checkpoint_path).is_file():
            _as_usage_error(check_resume_weights, strategy.lightning_module, checkpoint_path)
        try:
            checkpoint = load(checkpoint_path, *args, **kwargs)
        except Exception as e:  # only the file is being read here: whatever fails is about it
            _mark_user_error(e, f"cannot resume from --ckpt_path {checkpoint_path}: {_summary(e)}")
            raise
        if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:  # Lightning needs it
            raise UsageError(f"cannot resume from --ckpt_path {checkpoint_path}: not a Lightning training checkpoint")
        return checkpoint

    def load_model_state_dict(*args: Any, **kwargs: Any) -> Any:
        try:
            return load_weights(*args, **kwargs)
        except (KeyError, RuntimeError, ValueError) as e:  # missing, unexpected or mis-shaped weights
            _mark_user_error(e, f"the --ckpt_path checkpoint does not fit the model: {_summary(e)}")
            raise

    strategy.load_checkpoint, strategy.load_model_state_dict = load_checkpoint, load_model_state_dict


def cli_main(args: list[str] | None = None) -> None:
    """Runs LightningCLI; any task and data module is picked by ``class_path`` in the config.

    Raises:
        UsageError: a FIFO or device on the command line, or a ``--ckpt_path`` that is not a checkpoint file.
        Exception: what Lightning or torch raise; those that are the user's to fix (a checkpoint that fails to load,
            a class in the config that refuses its arguments) keep their type and are marked for :func:`fit_main`.
    """
    refuse_special_files(sys.argv[1:] if args is None else args)
    make_cli(args)


def make_cli(args: list[str] | None = None) -> None:
    """vlm's LightningCLI over ``args`` (``sys.argv`` when None): parses them and runs the subcommand."""
    _new_cli(args, run=True)


def build_from_config(args: list[str]) -> Any:
    """The LightningCLI for ``args`` (a config, no subcommand), parsed, with its task, data module and trainer built
    (``.model``, ``.datamodule``, ``.trainer``) and nothing run: what a config would train."""
    return _new_cli(args, run=False)


def _new_cli(args: list[str] | None, run: bool) -> Any:
    from lightning.pytorch import LightningDataModule, LightningModule

    return _cli_class()(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        save_config_kwargs={"overwrite": True}, args=args, run=run)


def _none() -> None:
    return None


def _cli_class() -> type:
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    class CLI(LightningCLI):
        """Hands the data module the task's tokenizer and image settings. Reads ``--ckpt_path`` with
        ``weights_only=True`` unless ``--weights_only false`` is given: Lightning leaves it to torch's default, which
        the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` variable turns into unpickling code. Checks ``--ckpt_path`` before the
        run starts, and marks what loading it raises as a user error."""

        def __reduce__(self) -> tuple:
            # The optimizer and schedule callables jsonargparse builds keep Lightning's instantiator, which holds this
            # CLI (it is only called for tasks and data modules, so never again once they are built): a task pickled
            # for spawned processes (strategy ddp_spawn) carries None in its place.
            return _none, ()

        def add_arguments_to_parser(self, parser: Any) -> None:
            # Stated once, on the task and its model; the data module gets the task's objects once it is built. A
            # link whose source the task lacks (the language model has no image settings) or whose target the data
            # module lacks (text data has no images) is not applied.
            for name in ("tokenizer", "image_size", "image_mean", "image_std"):
                parser.link_arguments(f"model.{name}", f"data.init_args.{name}", apply_on="instantiate")

        def parse_arguments(self, parser: Any, args: Any) -> None:
            super().parse_arguments(parser, args)
            # Lightning reads the checkpoint's hyper-parameters right after parsing (LightningCLI._parse_ckpt_path):
            # the file is checked before that first read.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and ckpt_path not in _CKPT_KEYWORDS and not str(ckpt_path).startswith("registry"):
                from vlm.formats.resume import check_checkpoint_file

                _as_usage_error(check_checkpoint_file, ckpt_path)

        def _parse_ckpt_path(self) -> None:
            # LightningCLI's (private) step that would merge the task config a --ckpt_path records into this run's
            # config for jsonargparse to build. vlm never does: a file's values would reach torch.compile, the
            # optimizer or an import. The file is read and checked here instead, and a difference from this run's
            # config is one line of notice; the run is built from its own config alone.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if not ckpt_path or not Path(ckpt_path).is_file():
                return
            from vlm.formats.resume import read_resume_checkpoint

            hparams = _as_usage_error(read_resume_checkpoint, ckpt_path).get("hyper_parameters") or {}
            if not (isinstance(hparams, dict) and "_class_path" in hparams):
                return
            from vlm.formats.checkpoint import TRAINING_ONLY, task_config

            recorded = task_config(hparams, str(ckpt_path))
            current = self.config[subcommand].get("model")
            current = current.as_dict() if hasattr(current, "as_dict") else current
            if isinstance(current, dict):
                current = {**current, "init_args": {k: v for k, v in (current.get("init_args") or {}).items()
                                                    if k not in TRAINING_ONLY}}  # fmt: skip
            from vlm.formats.resume import config_differences

            differences = config_differences(recorded, current)
            if differences and os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
                from vlm.inputs import printable

                print(printable(f"vlm: note: --ckpt_path {ckpt_path} was written with another task config ("
                                f"{'; '.join(differences)}); its weights and loop state resume under this run's "
                                "config"), file=sys.stderr)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, MisconfigurationException) as e:  # a class in the config refused its arguments
                _mark_user_error(e, f"the config was refused: {_summary(e)}")
                raise

        def _safe_loading(self) -> None:
            if self.config_init[self.subcommand].get("weights_only") is None:
                self.config_init[self.subcommand]["weights_only"] = True
            _guard_strategy(self.trainer.strategy)

        before_fit = before_validate = before_test = before_predict = _safe_loading

    return CLI


def fit_main(argv: list[str] | None = None) -> int:
    """``vlm fit|validate|test|predict ...`` (``argv`` from the subcommand on; None: ``sys.argv``, which LightningCLI
    reads itself); returns the exit code: 0, 1 for a training stopped by a non-finite loss, 2 for a user error (one
    ``vlm: error:`` line)."""
    from vlm.data.shapes import StaleDataError
    from vlm.data.sources import DataLayoutError
    from vlm.inputs import printable
    from vlm.interop.weights import WeightsSourceError
    from vlm.reliability import NonFiniteError

    try:
        cli_main(argv)  # None: LightningCLI reads sys.argv itself (and warns if given both)
    except NonFiniteError as e:  # NonFiniteGuard(policy="stop"): one line naming the step, not a traceback
        print(f"vlm: error: {e}", file=sys.stderr)
        return 1
    except StaleDataError as e:  # a data folder left by another config: the user's to move, not a crash
        print(f"vlm: error: {e}", file=sys.stderr)
        return 2
    except WeightsSourceError as e:  # an earlier stage's checkpoint that is missing or does not fit the config
        print(f"vlm: error: {e}", file=sys.stderr)
        return 2
    except DataLayoutError as e:  # a data folder in no layout vlm reads, or a data path that does not exist
        print(f"vlm: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except UsageError as e:  # a FIFO on the command line, a --ckpt_path that is not a checkpoint
        print(f"vlm: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:
        message = getattr(e, _USER_ERROR, None)
        if message is None:  # a bug, or a failure in training: the traceback is what helps
            raise
        print(f"vlm: error: {printable(message)}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Destroys the distributed process group a DDP/FSDP run joined, before the interpreter exits: Lightning leaves
    it up, and Gloo's worker threads torn down during interpreter finalisation abort the process now and then
    (``terminate called without an active exception``, exit -6) after a run that finished."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
