"""How every ``dit`` command ends on an error: one line ``error: ...`` on stderr and a non-zero exit code.

Each command's entry point runs its work through :func:`run_command` with the exception types it knows as user
errors (a bad value, a missing file, a config error: exit code by type, or the exception's own ``exit_code``).
Ctrl-C prints ``interrupted`` and exits with 130. ``--debug`` (anywhere on the command line, taken out by
:func:`take_debug_flag`) or ``DIT_DEBUG=1`` shows the full traceback instead. An exception no command expects (a
bug) keeps its traceback, followed by a line saying so.

Stdlib only: the commands import it before torch, and every layer may use it.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "DIT_DEBUG"
INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class UsageError(ValueError):
    """A command-line value the command cannot use (a missing folder, an unavailable device, an empty prompt file);
    the message names the option, the value and the fix."""


def take_debug_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--debug`` (before a ``--``); finding it turns debug mode on (``DIT_DEBUG=1``, which child
    processes such as ``accelerate launch`` inherit)."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    if DEBUG_FLAG in argv[:end]:
        os.environ[DEBUG_ENV] = "1"
        argv = [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:]
    return argv


def debug() -> bool:
    """Whether errors show their full traceback (``--debug`` or ``DIT_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (a KeyError's without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split()) or type(error).__name__


def fail(error: BaseException | str, code: int = 2) -> int:
    """Print ``error: MESSAGE`` on stderr; returns ``code``."""
    message = error if isinstance(error, str) else one_line(error)
    print(f"error: {message}", file=sys.stderr)
    return code


ErrorCodes = Mapping[type[BaseException], int]


def run_command(command: Callable[[], int], user_errors: ErrorCodes | Callable[[], ErrorCodes]) -> int:
    """``command()``'s exit code; a ``user_errors`` exception (type -> exit code, or its own ``exit_code``) prints one
    line, Ctrl-C prints ``interrupted`` (130); in debug mode both raise with their traceback.

    ``user_errors`` may be a function, called only when an exception arrives: the modules that define the types need
    not be imported before the command runs (a bad config then fails before torch is imported)."""
    try:
        return command()
    except KeyboardInterrupt:
        if debug():
            raise
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:
        if debug():
            raise
        codes = user_errors() if callable(user_errors) else user_errors
        if not isinstance(error, tuple(codes)):
            traceback.print_exc()
            print("error: an unexpected error (the traceback above); please report it.", file=sys.stderr)
            return 1
        code = getattr(error, "exit_code", None)
        return fail(error, code if isinstance(code, int) else _code_of(error, codes))


def loaded_errors(package: str, where: Mapping[str, Mapping[str, int]]) -> dict[type[BaseException], int]:
    """The exception types named in ``where`` (``{module: {class name: exit code}}``, modules relative to
    ``package``) whose modules are imported: one never imported cannot have raised, so it is not imported here."""
    codes = {}
    for module, classes in where.items():
        loaded = sys.modules.get(f"{package}.{module}")
        if loaded is not None:
            codes.update({getattr(loaded, name): code for name, code in classes.items()})
    return codes


@contextmanager
def as_usage_error(*kinds: type[BaseException]) -> Iterator[None]:
    """Re-raise ``kinds`` raised in the block (a bad value or folder met while setting up) as :class:`UsageError`
    with the same message; the original stays attached (``--debug`` shows both tracebacks)."""
    try:
        yield
    except UsageError:
        raise
    except kinds as error:
        raise UsageError(one_line(error)) from error


def _code_of(error: BaseException, user_errors: Mapping[type[BaseException], int]) -> int:
    return next(code for kind, code in user_errors.items() if isinstance(error, kind))


@contextmanager
def removed_if_left_empty(folder: str | Path | None) -> Iterator[None]:
    """Remove ``folder`` (and the parents the block created for it) when the block fails and left it empty (only
    empty folders inside) and it did not exist before: a failed start leaves nothing behind; a folder that was there
    is never removed."""
    new = _first_missing(Path(folder)) if folder is not None else None
    try:
        yield
    except BaseException:
        if new is not None and new.is_dir() and not any(p.is_file() or p.is_symlink() for p in new.rglob("*")):
            shutil.rmtree(new, ignore_errors=True)
        raise


def _first_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (what creating it would add); None when
    ``folder`` exists."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            break
        missing = path
    return missing
