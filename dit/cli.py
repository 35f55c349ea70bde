"""The ``dit`` command: ``dit generate "PROMPT" --model PATH -o out.png``, ``dit eval microshapes --model PATH``,
``dit train --config ...``, ``dit extract DATA --pipeline P --out D``, ``dit convert FAMILY CHECKPOINT OUT``,
``dit controlnet-relevance --model BASE --controlnet ADAPTER``.

One convention for every command: a module, listed in :data:`COMMANDS`, with

* ``add_parser(commands)``: adds the command's subparser to ``commands`` (argparse sub-parsers), with its help and
  arguments (``dit train`` keeps its ``key=value`` overrides as trailing positional arguments), and sets the
  defaults ``func=run`` and ``user_errors`` (a function returning the exception types the command prints as one line,
  with their exit codes; called only when an exception arrives);
* ``run(args) -> int``: the work, returning the exit code.

A command module imports neither torch nor diffusers at module level (``run`` imports what it needs), so building the
parser is light and ``dit --help`` and every ``dit COMMAND --help`` answer at once. :func:`main` takes ``--debug``
out of the arguments (anywhere before ``--``), parses them and calls ``run`` through :func:`dit.errors.run_command`:
a user error is one line ``error: ...`` (``--debug`` or ``DIT_DEBUG=1``: its traceback), Ctrl-C exits with 130, an
interrupted training run with 128 + the signal, a usage error of argparse with 2. ``python -m dit.train`` and
``python -m dit.train.extract`` run the same modules' ``main`` on their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dit import __version__
from dit import controlnet_relevance as controlnet_relevance_command
from dit.commands import convert as convert_command
from dit.commands import evaluate as eval_command
from dit.commands import generate as generate_command
from dit.errors import DEBUG_ENV, run_command, take_debug_flag
from dit.microshapes.shipped import default_lcm, default_model
from dit.train import command as train_command
from dit.train.extract import command as extract_command

__all__ = ["COMMANDS", "build_parser", "default_lcm", "default_model", "main"]

#: The modules of the ``dit`` commands, in the order ``dit --help`` lists them.
COMMANDS = (
    generate_command, eval_command, train_command, extract_command, convert_command, controlnet_relevance_command,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``dit`` command line: every command of :data:`COMMANDS` as a subcommand; imports no torch."""
    parser = argparse.ArgumentParser(
        prog="dit",
        description="Diffusion-transformer toolkit.",
        epilog=f"An error is one line 'error: ...' on stderr; --debug (or {DEBUG_ENV}=1) shows its traceback.",
    )
    parser.add_argument("--version", action="version", version=f"dit-toolkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also accepted "
                        f"after the command; or set {DEBUG_ENV}=1)")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dit COMMAND ...``: the command's exit code; an error is one line on stderr (see :mod:`dit.errors`)."""
    args = build_parser().parse_args(take_debug_flag(sys.argv[1:] if argv is None else argv))
    return run_command(lambda: args.func(args), args.user_errors)


if __name__ == "__main__":
    raise SystemExit(main())
