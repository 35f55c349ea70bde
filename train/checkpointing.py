"""Atomic checkpoint folders: written under a temporary name, renamed, then pointed at by ``latest``."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

LATEST = "latest"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(root: Path) -> Path:
    return Path(root) / "checkpoints"


def temporary_path(root: Path, step: int, clear: bool = True) -> Path:
    """Where a checkpoint is written before it is renamed into place; ``clear`` removes a stale one."""
    path = checkpoint_dir(root) / f"checkpoint-{step}.tmp"
    if clear and path.exists():
        shutil.rmtree(path)
    return path


def publish(root: Path, tmp: Path, step: int, keep: int | None) -> Path:
    """Rename a finished checkpoint into place, point ``latest`` at it, and prune old ones."""
    final = checkpoint_dir(root) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = checkpoint_dir(root) / (LATEST + ".tmp")
    pointer.write_text(final.name)
    os.replace(pointer, checkpoint_dir(root) / LATEST)  # atomic: latest never names a half-written folder
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    folder = checkpoint_dir(root)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve(resume: str, root: Path) -> Path:
    """``latest`` (the run's newest finished checkpoint) or a checkpoint path; a clear error otherwise."""
    if resume == LATEST:
        pointer = checkpoint_dir(root) / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"resume=latest, but {checkpoint_dir(root)} has no finished checkpoint.")
        return checkpoint_dir(root) / pointer.read_text().strip()
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{resume!r} is not a finished checkpoint folder (no trainer_state.json).")
    return path


def step_of(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named checkpoint-<step>.")
    return int(match.group(1))
