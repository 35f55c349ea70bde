"""The checks of the ``dit`` commands' arguments, run before any model loads: prompts (``--prompt-file``, ``@FILE``),
``-o``, ``--device`` and report paths. A bad one raises :class:`~dit.errors.UsageError` naming the option and the
fix."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from dit.errors import UsageError, one_line

#: Errors of the checks and the loading before any work: a bad value or folder (one line, exit code 2).
SETUP_ERRORS = (ValueError, KeyError, OSError)


def read_prompts(prompts: Sequence[str], prompt_file: str | None) -> list[str]:
    """The prompts to draw: each of ``prompts`` (``@FILE`` reads FILE), then those of ``prompt_file`` (``-``: stdin);
    a prompt file holds one prompt per non-empty line."""
    found = []
    for prompt in prompts:
        found += _prompts_of(prompt[1:], f"prompt {prompt!r}") if prompt.startswith("@") else [prompt]
    if prompt_file is not None:
        found += _prompts_of(prompt_file, f"--prompt-file {prompt_file}")
    if not found:
        raise UsageError("no prompt: give one or several prompts, or --prompt-file FILE (one prompt per line).")
    return found


def _prompts_of(file: str, what: str) -> list[str]:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{what}: cannot read the prompt file ({one_line(error)}).") from error
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{what}: the prompt file has no prompts (one prompt per non-empty line).")
    return prompts


def check_output(output: str | Path) -> None:
    """``-o``: a file name with an image extension, in a folder that exists (checked before the model loads)."""
    from PIL import Image

    output = Path(output)
    if output.is_dir():
        raise UsageError(f"-o {output}: is a folder; give a file name such as {output / 'out.png'}.")
    if not output.parent.is_dir():
        raise UsageError(f"-o {output}: the folder {output.parent} does not exist; create it first.")
    if output.suffix and output.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"-o {output}: {output.suffix} is not an image format; use .png or .jpg.")


def resolve_device(device: str | None) -> str:
    """``--device``, checked before the model loads (default: cuda when available, else cpu)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise UsageError(f"--device {device}: not a device ({one_line(error)}); use cpu or cuda.") from error
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(kind)
    if backend is not None and not backend.is_available():
        raise UsageError(f"--device {device}: {kind} is not available on this machine; use --device cpu.")
    return device


def check_report_path(path: str | None, flag: str = "--json") -> None:
    """A report file's folder exists (checked before any work)."""
    if path is not None and not Path(path).parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it first.")
