"""The ``vlm`` command.

- ``vlm fit|validate|test|predict --config FILE [--key value ...]``: LightningCLI over the tasks in ``vlm.tasks``.
- ``vlm data shapes|digits|shards ...``: writes the built-in datasets (see ``vlm data --help``).
- ``vlm export --checkpoint CKPT --out DIR``: model weights as safetensors plus the constructor config.
"""

from __future__ import annotations

import sys


def cli_main(args: list[str] | None = None) -> None:
    """Runs LightningCLI; any task and data module is picked by ``class_path`` in the config."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class CLI(LightningCLI):
        """Reads ``--ckpt_path`` with ``weights_only=True`` unless ``--weights_only false`` is given: Lightning leaves
        it to torch's default, which the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` variable turns into unpickling code."""

        def _safe_loading(self) -> None:
            if self.config_init[self.subcommand].get("weights_only") is None:
                self.config_init[self.subcommand]["weights_only"] = True

        before_fit = before_validate = before_test = before_predict = _safe_loading

    CLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":
        from vlm.data.commands import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "export":
        from vlm.interop.export import main as export_main

        return export_main(argv[1:])
    from vlm.data.shapes import StaleDataError
    from vlm.interop.weights import WeightsSourceError
    from vlm.reliability import NonFiniteError

    try:
        cli_main(None if from_command_line else argv)  # LightningCLI reads sys.argv itself (and warns if given both)
    except NonFiniteError as e:  # NonFiniteGuard(policy="stop"): one line naming the step, not a traceback
        print(f"vlm: error: {e}", file=sys.stderr)
        return 1
    except StaleDataError as e:  # a data folder left by another config: the user's to move, not a crash
        print(f"vlm: error: {e}", file=sys.stderr)
        return 2
    except WeightsSourceError as e:  # an earlier stage's checkpoint that is missing or does not fit the config
        print(f"vlm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
