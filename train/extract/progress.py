"""Resumable extraction: which shards a process finished, atomic writes, and the settings a feature folder was
extracted with (``extract_config.json``), so a re-run into the same ``--out`` resumes where it stopped and never mixes
in shards of another extraction."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit.checkpoint import restore_default_permissions

from ..data.dataset import NULL_CAPTION_FILE

CONFIG_FILE = "extract_config.json"


class ExtractError(ValueError):
    """A bad value or an output folder that cannot be resumed; ``dit extract`` prints it without a traceback."""


PROGRESS_FILE = "extract_progress-p{rank}.json"


SHARD_NAME = re.compile(r"^\d+x\d+-p(\d+)-(\d+)\.safetensors$")


def to_ranges(indices: Sequence[int]) -> list[list[int]]:
    """Indices as ``[start, stop, step]`` Python ranges, ascending: [0, 1, 2, 5, 7] -> [[0, 3, 1], [5, 8, 2]]."""
    ranges: list[list[int]] = []
    for i in sorted(set(indices)):
        if ranges and ranges[-1][1] - 1 == ranges[-1][0] and i > ranges[-1][0]:  # one element: any step
            ranges[-1] = [ranges[-1][0], i + 1, i - ranges[-1][0]]
        elif ranges and i - (ranges[-1][1] - 1) == ranges[-1][2]:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1, 1])
    return ranges


def from_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    """The indices of :func:`to_ranges` triples."""
    return [i for start, stop, step in ranges for i in range(start, stop, step)]


def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written under ``NAME.tmp`` and renamed: a crash never leaves a half-written ``NAME``."""
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, temporary, metadata=metadata)
    restore_default_permissions(temporary)  # safetensors writes 0o600
    os.replace(temporary, path)


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` written under ``NAME.tmp`` and renamed."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_json(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ExtractError(f"{file} is not valid JSON ({err}); delete it or use another --out.") from err


class Progress:
    """One process's progress file, ``extract_progress-p{rank}.json``: ``{"rank": r, "shards": {name: ranges}}``,
    the shards the process has written and the record indices each holds (:func:`to_ranges` triples), rewritten
    atomically after each shard. Shards whose file is gone are dropped when it is read."""

    def __init__(self, out: Path, rank: int):
        self.file, self.rank = out / PROGRESS_FILE.format(rank=rank), rank
        saved = (read_json(self.file) or {}).get("shards", {})
        self.shards = {name: ranges for name, ranges in saved.items() if (out / name).is_file()}

    def next_number(self) -> int:
        """The number of this process's next shard file."""
        numbers = [int(SHARD_NAME.match(name).group(2)) for name in self.shards if SHARD_NAME.match(name)]
        return max(numbers, default=-1) + 1

    def add(self, name: str, indices: Sequence[int]) -> None:
        self.shards[name] = to_ranges(indices)
        lines = [f"    {json.dumps(shard)}: {json.dumps(ranges)}" for shard, ranges in self.shards.items()]
        write_text_atomically(self.file, f'{{"rank": {self.rank}, "shards": {{\n' + ",\n".join(lines) + "\n}}\n")


def finished_shards(out: Path) -> dict[str, list[int]]:
    """Every shard listed in any process's progress file (of this run's world size or another), with its records."""
    shards = {}
    for file in sorted(out.glob(PROGRESS_FILE.format(rank="*"))):
        rank = int(file.stem.rpartition("-p")[2])
        shards.update({name: from_ranges(ranges) for name, ranges in Progress(out, rank).shards.items()})
    return shards


def remove_unfinished(out: Path, listed: set[str], owned) -> list[str]:
    """Delete the shard files of ranks ``owned(rank)`` that no progress file lists, and their temporary files."""
    removed = []
    for file in sorted(out.iterdir()):
        name = file.name.removesuffix(".tmp")
        match = SHARD_NAME.match(name)
        if match and owned(int(match.group(1))) and (file.name != name or name not in listed):
            file.unlink()
            removed.append(file.name)
    return removed


def check_settings(out: Path, settings: dict) -> None:
    """An :class:`ExtractError` when ``out`` was extracted with other settings, or holds shards of an unknown
    extraction; nothing when it is new or was made with these settings."""
    saved = read_json(out / CONFIG_FILE)
    if saved is None:
        shards = [p.name for p in out.glob("*.safetensors") if p.name != NULL_CAPTION_FILE] if out.is_dir() else []
        if shards:
            raise ExtractError(
                f"{out} already holds feature shards ({shards[0]}, ...) but no {CONFIG_FILE}: they are not from a "
                "resumable `dit extract`. Extract into an empty --out (or delete those shards)."
            )
        return
    different = [k for k in settings if saved.get(k) != settings[k]]
    if different:
        was = ", ".join(f"{k}={json.dumps(saved.get(k))}" for k in different)
        now = ", ".join(f"{k}={json.dumps(settings[k])}" for k in different)
        raise ExtractError(
            f"Cannot resume into {out}: its {CONFIG_FILE} has {was} but this run has {now}. Rerun with the same "
            "settings to resume, or extract into another --out."
        )
