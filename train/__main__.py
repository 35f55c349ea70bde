"""``python -m dit.train --config configs/NAME.yaml [key=value ...]`` (also under ``accelerate launch -m``).

The arguments are parsed before the trainer is imported, so ``--help`` answers without torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dit.errors import removed_if_left_empty, run_command, take_debug_flag


def build_parser() -> argparse.ArgumentParser:
    """``dit train``'s arguments: a config file and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(prog="dit train", description="Train a backbone with accelerate.")
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 max_steps=100")
    return parser


def user_errors() -> dict[type[BaseException], int]:
    """What ``dit train`` prints as one line ``error: ...`` (exit code); anything else keeps its traceback."""
    from .checkpointing import CheckpointError, NoSpaceLeft, RunLocked
    from .config import ConfigError
    from .data import ShardError
    from .loop import TrainingDiverged

    return {ConfigError: 2, RunLocked: 1, NoSpaceLeft: 1, CheckpointError: 1, ShardError: 1, TrainingDiverged: 1,
            FileNotFoundError: 1}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and train; a configuration or run-folder error prints one line and returns non-zero
    (``--debug`` or ``DIT_DEBUG=1``: its traceback), Ctrl-C before training prints ``interrupted`` (130)."""
    args = build_parser().parse_args(take_debug_flag(sys.argv[1:] if argv is None else argv))
    return run_command(lambda: _train(args.config, args.overrides), user_errors())


def _train(path: str | None, overrides: list[str]) -> int:
    from .config import load_config
    from .interrupts import TrainingInterrupted
    from .loop import Trainer

    config = load_config(path, overrides)
    try:
        with removed_if_left_empty(config.output_dir):  # a failed start leaves no new empty output_dir behind
            Trainer(config).train()
    except TrainingInterrupted as interrupted:  # SIGINT/SIGTERM: checkpointed; the main process says so
        if interrupted.report:
            print(interrupted, file=sys.stderr)
        return interrupted.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
