"""Captioned image sources: an image folder with ``metadata.jsonl``, webdataset tar shards, a saved HF dataset.

Each source yields :class:`Record` objects, numbered in a fixed order by :func:`open_source` (``index``), whose
``load()`` returns ``(PIL image, caption)`` or raises :class:`BrokenSample` with the reason; callers skip and
report those one by one. A problem found while listing (a malformed ``metadata.jsonl`` line, an unreadable tar
shard) becomes a record that is broken, so nothing in a source stops the listing.

Captions: an empty (or blank) caption is a valid sample, trained as the unconditional caption; a record with no
caption field at all (``text`` or ``caption``; a ``.txt``/``.json`` member in a tar shard) is broken.
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
    """A sample that cannot be used (unreadable image, missing file or caption); the message says why."""


@dataclass
class Record:
    """One sample of a source.

    Args:
        key: what a person looks it up by: the file name, ``shard.tar:key`` or ``dataset[i]``.
        read: returns the image (bytes or PIL) and the caption (None when there is no caption field).
        name: the file name a control image of this sample has in a control folder (``--control FOLDER``).
        line: the ``metadata.jsonl`` line number (1-based) for image folders, else None.
        problem: set when the listing already found the record broken; ``load()`` raises it.
        index: the record's position in its source (set by :func:`open_source`).
    """

    key: str
    read: Callable[[], tuple[bytes | Image.Image, str | None]] | None = None
    name: str = ""
    line: int | None = None
    problem: str | None = None
    index: int = -1

    def load(self) -> tuple[Image.Image, str]:
        """(RGB image, stripped caption), or :class:`BrokenSample` with the reason."""
        if self.problem is not None:
            raise BrokenSample(self.problem)
        try:
            data, caption = self.read()
        except (OSError, KeyError, ValueError) as err:
            raise BrokenSample(f"cannot read {self.key}: {err}") from err
        if caption is None:
            raise BrokenSample(f"no caption (a {' or '.join(CAPTION_KEYS)} field)")
        try:
            image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
            image.load()
            image = image.convert("RGB")
        except Exception as err:  # PIL raises many kinds for a corrupt file
            detail = str(err).split(" <_io.")[0]  # PIL names the in-memory buffer, which says nothing
            raise BrokenSample(f"unreadable image ({type(err).__name__}: {detail})") from err
        return image, str(caption).strip()


def _caption_of(row: dict) -> str | None:
    """The first non-empty caption field of a row; "" if the fields are all empty; None if there is none."""
    present = [row[k] for k in CAPTION_KEYS if row.get(k) is not None]
    return next((c for c in present if str(c).strip()), present[0] if present else None)


def image_folder(path: Path) -> Iterator[Record]:
    """``metadata.jsonl`` rows ``{"file_name": ..., "text": ...}`` (diffusers' training examples' layout); blank
    lines are skipped, a malformed line is a broken record naming its line number."""
    metadata = Path(path) / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found: an image folder needs metadata.jsonl with file_name and text.")
    for number, line in enumerate(metadata.read_bytes().splitlines(), start=1):
        if line.strip():
            yield _folder_record(Path(path), number, line)


def _folder_record(root: Path, number: int, line: bytes) -> Record:
    where = f"metadata.jsonl line {number}"
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return Record(where, line=number, problem=f"malformed {where} ({err}): {line[:80]!r}")
    if not isinstance(row, dict):
        return Record(where, line=number, problem=f"{where} is not a JSON object: {line[:80]!r}")
    if not isinstance(row.get("file_name"), str) or not row["file_name"]:
        return Record(where, line=number, problem=f"{where} has no file_name: {line[:80]!r}")
    file = root / row["file_name"]

    def read():
        return file.read_bytes(), _caption_of(row)

    return Record(row["file_name"], read, name=row["file_name"], line=number)


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's convention: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_groups(shard: Path) -> tuple[dict[str, dict[str, bytes]], str | None]:
    """The members of a tar shard grouped by key, and the error that stopped the reading (None when none did)."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    key, ext = _split_member(member.name)
                    groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        return groups, f"unreadable tar shard {shard} ({type(err).__name__}: {err})"
    return groups, None


def webdataset(path: Path) -> Iterator[Record]:
    """Tar shards whose members share a key: ``KEY.jpg|png|...`` plus ``KEY.txt`` or ``KEY.json``. An unreadable
    (or truncated) shard gives the samples read before the damage and one broken record for the shard."""
    shards = sorted(Path(path).glob("*.tar")) if Path(path).is_dir() else [Path(path)]
    if not shards:
        raise FileNotFoundError(f"No .tar shards in {path}.")
    for shard in shards:
        groups, error = _tar_groups(shard)
        for key, parts in groups.items():

            def read(parts=parts):
                image = next((parts[e[1:]] for e in IMAGE_SUFFIXES if e[1:] in parts), None)
                if image is None:
                    raise KeyError(f"no image member ({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
                caption = parts["txt"].decode() if "txt" in parts else None
                if caption is None and "json" in parts:
                    caption = _caption_of(json.loads(parts["json"]))
                return image, caption

            yield Record(f"{shard.name}:{key}", read, name=key)
        if error:
            yield Record(shard.name, problem=error)


def hf_dataset(path: Path) -> Iterator[Record]:
    """A dataset saved with ``datasets``' ``save_to_disk``, with an ``image`` and a ``text``/``caption`` column.
    Its control images (``--control FOLDER``) are named by the row number (``0.png``, ``1.png``, ...)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("The 'hf' source needs the `datasets` package: pip install datasets") from err
    dataset = datasets.load_from_disk(str(path))
    for index in range(len(dataset)):

        def read(index=index):
            row = dataset[index]
            return row["image"], _caption_of(row)

        yield Record(f"{Path(path).name}[{index}]", read, name=str(index))


SOURCES: dict[str, Callable[[Path], Iterator[Record]]] = {
    "imagefolder": image_folder,
    "webdataset": webdataset,
    "hf": hf_dataset,
}


def open_source(kind: str, path: str | Path) -> Iterator[Record]:
    """The records of ``path`` read as a ``kind`` source, each with its ``index`` (0, 1, ... in a fixed order)."""
    if kind not in SOURCES:
        raise ValueError(f"Unknown data source {kind!r}; choose one of {sorted(SOURCES)}.")
    return _numbered(SOURCES[kind](Path(path)))


def _numbered(records: Iterator[Record]) -> Iterator[Record]:
    for index, record in enumerate(records):
        record.index = index
        yield record
