"""Reading weights safely: safetensors, or pickle read weights-only (full unpickling only on explicit opt-in),
strict key checks."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


class CheckpointKeyError(KeyError):
    """A state dict whose keys do not match the model: lists the missing and the unexpected ones."""

    def __init__(self, missing: Iterable[str], unexpected: Iterable[str], where: str = "checkpoint"):
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        lines = [f"The {where} does not match the model."]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                lines.append(f"{len(keys)} {name} key(s): {shown}")
        super().__init__("\n".join(lines))

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return self.args[0]


def check_keys(expected: Iterable[str], found: Iterable[str], where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointKeyError` unless the two key sets are equal."""
    expected, found = set(expected), set(found)
    if expected != found:
        raise CheckpointKeyError(expected - found, found - expected, where)


def read_pickle(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """What the pickle file at ``path`` holds, read as diffusers reads ``.bin`` weights: ``torch.load(...,
    weights_only=True)``, which builds tensors and plain containers only and cannot run code.

    A file that needs more (a pickled class or function: original training checkpoints, some of which store their
    config or optimizer objects) is refused, naming ``allow_pickle``; with ``allow_pickle=True`` it is unpickled in
    full, which can execute code: only for files from a trusted source.
    """
    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            lines = [line.strip() for line in str(error).splitlines() if "WeightsUnpickler error:" in line]
            reason = lines[0].split(":", 1)[1].split(" was not", 1)[0].strip() if lines else type(error).__name__
            raise ValueError(
                f"{path!r} holds more than weights: torch.load(weights_only=True) cannot read it ({reason}). "
                "Reading it in full can execute code: pass allow_pickle=True (--allow-pickle) if you trust its "
                "source, or convert it to safetensors."
            ) from error
    return torch.load(path, map_location="cpu", weights_only=False)


def load_state_dict_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file or a pickle checkpoint (``.bin``, ``.pth``, ...).

    Pickle files are read with ``weights_only=True``, as diffusers reads them; one that needs code to load is
    refused unless ``allow_pickle=True`` (:func:`read_pickle`). A pickle checkpoint that wraps its weights in
    ``{"state_dict": ...}`` (as PixArt's do) is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    if path.endswith(".safetensors"):
        return load_file(path)
    if not path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"Unknown checkpoint format for {path!r}: expected .safetensors or one of {PICKLE_SUFFIXES}.")
    state = read_pickle(path, allow_pickle=allow_pickle)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return dict(state)


def default_file_mode() -> int:
    """The mode a plainly created file gets here: ``0o666`` less the process's umask (``0o644`` under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def restore_default_permissions(path: str | os.PathLike) -> None:
    """Give the weight files at ``path`` (a file, or every one under a folder) the umask's normal mode.

    safetensors (0.8) writes each file through a private temporary file, so it ends up ``0o600`` whatever the umask:
    a pipeline folder saved for others to read would be readable by its owner alone. Called after every save of
    weights (models, pipelines, checkpoints, feature shards)."""
    path, mode = Path(path), default_file_mode()
    files = [path] if path.is_file() else (p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    for file in files:
        if file.is_file() and not file.is_symlink() and file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)
