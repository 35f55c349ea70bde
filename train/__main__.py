"""``python -m dit.train --config configs/NAME.yaml [key=value ...]`` (also under ``accelerate launch -m``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dit.errors import removed_if_left_empty, run_command, take_debug_flag

from .checkpointing import CheckpointError, NoSpaceLeft, RunLocked
from .config import ConfigError, load_config
from .data import ShardError
from .interrupts import TrainingInterrupted
from .loop import Trainer, TrainingDiverged

#: What ``dit train`` prints as one line ``error: ...`` (exit code); anything else keeps its traceback.
USER_ERRORS = {ConfigError: 2, RunLocked: 1, NoSpaceLeft: 1, CheckpointError: 1, ShardError: 1, TrainingDiverged: 1,
               FileNotFoundError: 1}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and train; a configuration or run-folder error prints one line and returns non-zero
    (``--debug`` or ``DIT_DEBUG=1``: its traceback), Ctrl-C before training prints ``interrupted`` (130)."""
    parser = argparse.ArgumentParser(prog="dit train", description="Train a backbone with accelerate.")
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 max_steps=100")
    args = parser.parse_args(take_debug_flag(sys.argv[1:] if argv is None else argv))
    return run_command(lambda: _train(args.config, args.overrides), USER_ERRORS)


def _train(path: str | None, overrides: list[str]) -> int:
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
