"""Captioned image sources: an image folder with ``metadata.jsonl``, webdataset tar shards, a saved HF dataset.

Each source yields :class:`Record` objects whose ``load()`` returns ``(PIL image, caption)`` or raises
:class:`BrokenSample` with the reason; callers skip and count those.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_KEYS = ("text", "caption")


class BrokenSample(ValueError):
    """A sample that cannot be used (unreadable image, missing caption); the message says which and why."""


@dataclass
class Record:
    key: str
    read: Callable[[], tuple[bytes | Image.Image, str | None]]

    def load(self) -> tuple[Image.Image, str]:
        try:
            data, caption = self.read()
        except (OSError, KeyError, ValueError) as err:
            raise BrokenSample(f"{self.key}: {err}") from err
        if not caption or not str(caption).strip():
            raise BrokenSample(f"{self.key}: missing caption")
        try:
            image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
            image.load()
        except Exception as err:  # PIL raises many kinds for a corrupt file
            raise BrokenSample(f"{self.key}: unreadable image ({type(err).__name__}: {err})") from err
        return image.convert("RGB"), str(caption).strip()


def _caption_of(row: dict) -> str | None:
    return next((row[k] for k in CAPTION_KEYS if row.get(k)), None)


def image_folder(path: Path) -> Iterator[Record]:
    """``metadata.jsonl`` rows ``{"file_name": ..., "text": ...}`` (diffusers' training examples' layout)."""
    metadata = Path(path) / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found: an image folder needs metadata.jsonl with file_name and text.")
    for number, line in enumerate(metadata.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        file = Path(path) / row.get("file_name", "")

        def read(file=file, row=row):
            return file.read_bytes(), _caption_of(row)

        yield Record(f"{metadata.name}:{number + 1} ({row.get('file_name')})", read)


def webdataset(path: Path) -> Iterator[Record]:
    """Tar shards whose members share a key: ``KEY.jpg|png|...`` plus ``KEY.txt`` or ``KEY.json``."""
    shards = sorted(Path(path).glob("*.tar")) if Path(path).is_dir() else [Path(path)]
    if not shards:
        raise FileNotFoundError(f"No .tar shards in {path}.")
    for shard in shards:
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        for key, parts in groups.items():

            def read(parts=parts):
                image = next((parts[e[1:]] for e in IMAGE_SUFFIXES if e[1:] in parts), None)
                if image is None:
                    raise KeyError("no image member")
                caption = parts["txt"].decode() if "txt" in parts else None
                if caption is None and "json" in parts:
                    caption = _caption_of(json.loads(parts["json"]))
                return image, caption

            yield Record(f"{shard.name}:{key}", read)


def hf_dataset(path: Path) -> Iterator[Record]:
    """A dataset saved with ``datasets``' ``save_to_disk``, with an ``image`` and a ``text``/``caption`` column."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("The 'hf' source needs the `datasets` package: pip install datasets") from err
    dataset = datasets.load_from_disk(str(path))
    for index in range(len(dataset)):

        def read(index=index):
            row = dataset[index]
            return row["image"], _caption_of(row)

        yield Record(f"{Path(path).name}[{index}]", read)


SOURCES: dict[str, Callable[[Path], Iterator[Record]]] = {
    "imagefolder": image_folder,
    "webdataset": webdataset,
    "hf": hf_dataset,
}


def open_source(kind: str, path: str | Path) -> Iterator[Record]:
    if kind not in SOURCES:
        raise ValueError(f"Unknown data source {kind!r}; choose one of {sorted(SOURCES)}.")
    return SOURCES[kind](Path(path))
