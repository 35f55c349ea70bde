"""Reading weights safely: safetensors by default, pickle only on explicit opt-in, strict key checks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


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


def load_state_dict_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file, or a pickle checkpoint when ``allow_pickle=True``.

    Pickle files can run code when loaded; even with the opt-in they are read with ``weights_only=True``.
    A pickle checkpoint that wraps its weights in ``{"state_dict": ...}`` (as PixArt's do) is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    if path.endswith(".safetensors"):
        return load_file(path)
    if not path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"Unknown checkpoint format for {path!r}: expected .safetensors or one of {PICKLE_SUFFIXES}.")
    if not allow_pickle:
        raise ValueError(
            f"{path!r} is a pickle checkpoint, which can execute code when loaded. Convert it to safetensors, "
            "or pass allow_pickle=True (--allow-pickle) if you trust its source."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return dict(state)
