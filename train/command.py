"""``dit train --config configs/NAME.yaml [key=value ...]``: a ``dit`` command (:mod:`dit.cli`'s convention:
:func:`add_parser` and :func:`run`), also ``python -m dit.train`` (:func:`main`, under ``accelerate launch -m`` too).

The arguments are parsed before the trainer is imported, so ``--help`` answers without torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dit.errors import loaded_errors, removed_if_left_empty, run_command, take_debug_flag

HELP = "train with accelerate: dit train --config configs/NAME.yaml [key=value ...]"
DESCRIPTION = "Train a backbone with accelerate."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``dit train``'s arguments: a config file and ``key=value`` overrides."""
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 max_steps=100")


def add_parser(commands) -> None:
    """The ``dit train`` subcommand of ``commands`` (argparse sub-parsers)."""
    parser = commands.add_parser("train", help=HELP, description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run, user_errors=user_errors)


#: ``dit train``'s user errors by the module (of ``dit.train``) that defines them, with their exit codes
USER_ERRORS = {
    "config_io": {"ConfigError": 2},
    "data.dataset": {"ShardError": 1},
    "loop": {"TrainingDiverged": 1},
    "run.checkpointing": {"RunLocked": 1, "NoSpaceLeft": 1, "CheckpointError": 1},
}


def user_errors() -> dict[type[BaseException], int]:
    """What ``dit train`` prints as one line ``error: ...`` (exit code); anything else keeps its traceback. Asked when
    an exception arrives: only the modules imported by then are looked at (a config error comes before torch)."""
    return {**loaded_errors(__package__, USER_ERRORS), FileNotFoundError: 1}


def run(args: argparse.Namespace) -> int:
    """Load the config and train; an interrupted run (SIGINT/SIGTERM, checkpointed) returns 128 + the signal."""
    from .config import load_config

    config = load_config(args.config, args.overrides)  # a bad config is said before torch is imported
    from .loop import Trainer
    from .run.interrupts import TrainingInterrupted

    try:
        with removed_if_left_empty(config.output_dir):  # a failed start leaves no new empty output_dir behind
            Trainer(config).train()
    except TrainingInterrupted as interrupted:  # SIGINT/SIGTERM: checkpointed; the main process says so
        if interrupted.report:
            print(interrupted, file=sys.stderr)
        return interrupted.exit_code
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dit.train``: parse the arguments and train; a configuration or run-folder error prints one line and
    returns non-zero (``--debug`` or ``DIT_DEBUG=1``: its traceback), Ctrl-C before training prints ``interrupted``
    (130)."""
    parser = argparse.ArgumentParser(prog="dit train", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(take_debug_flag(sys.argv[1:] if argv is None else argv))
    return run_command(lambda: run(args), user_errors)
