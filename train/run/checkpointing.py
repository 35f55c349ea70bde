"""The run folder: atomic checkpoints, a lock, a guard against reusing a folder, and resume that survives bad files.

Checkpoints are written under a temporary name, renamed, then pointed at by ``latest`` (a text file) and by
``latest-checkpoint`` (a relative symlink where the filesystem has them). Each records a publish ``sequence``, so
pruning keeps the checkpoints written last (not the highest step numbers) and never the one ``latest`` names.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
import warnings
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from dit.checkpoint import restore_default_permissions

from ..config import ConfigError

LATEST = "latest"
LATEST_LINK = "latest-checkpoint"
LOCK = ".lock"
METRICS = "metrics.jsonl"
#: What a run writes into output_dir (``overwrite: true`` deletes these and nothing else).
RUN_OUTPUTS = ("checkpoints", METRICS, "pipeline", "pipeline.tmp", "lcm", "validation", "logs", "loss.png")
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the cause."""


class NoSpaceLeft(OSError):
    """A checkpoint could not be written for lack of space (errno ENOSPC); the previous one is intact."""


class RunLocked(RuntimeError):
    """Another live run holds ``output_dir``'s lock."""


# ----- checkpoints -----------------------------------------------------------------------------------------------
def checkpoint_dir(root: Path) -> Path:
    return Path(root) / "checkpoints"


def temporary_path(root: Path, step: int, clear: bool = True) -> Path:
    """Where a checkpoint is written before it is renamed into place; ``clear`` removes a stale one."""
    path = checkpoint_dir(root) / f"checkpoint-{step}.tmp"
    if clear and path.exists():
        shutil.rmtree(path)
    return path


def write_trainer_state(folder: Path, root: Path, step: int) -> None:
    """``trainer_state.json``: the step, and the publish sequence that orders checkpoints by when they were written."""
    sequence = 1 + max((_sequence(p) for p in list_checkpoints(root)), default=0)
    (Path(folder) / "trainer_state.json").write_text(json.dumps({"step": step, "sequence": sequence}))


def _sequence(path: Path) -> int:
    """A checkpoint's publish sequence (0 when unrecorded or unreadable: older than every recorded one)."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text()).get("sequence", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def publish(root: Path, tmp: Path, step: int, keep: int | None) -> Path:
    """Rename a finished checkpoint into place, point ``latest`` at it, and prune the oldest ones."""
    final = checkpoint_dir(root) / f"checkpoint-{step}"
    restore_default_permissions(tmp)  # accelerate's save_state and save_pretrained write safetensors as 0o600
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = checkpoint_dir(root) / (LATEST + ".tmp")
    pointer.write_text(final.name)
    os.replace(pointer, checkpoint_dir(root) / LATEST)  # atomic: latest never names a half-written folder
    _link_latest(checkpoint_dir(root), final.name)
    if keep is not None:
        for old in by_recency(root)[:-keep]:
            if old != final:
                shutil.rmtree(old)
    return final


def _link_latest(folder: Path, name: str) -> None:
    """``latest-checkpoint`` -> ``name``, replaced atomically; skipped where the filesystem has no symlinks (the
    ``latest`` text file names the folder there)."""
    link, tmp = folder / LATEST_LINK, folder / (LATEST_LINK + ".tmp")
    with contextlib.suppress(OSError):
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp, target_is_directory=True)
        os.replace(tmp, link)


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, lowest step first."""
    folder = checkpoint_dir(root)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def by_recency(root: Path) -> list[Path]:
    """Finished checkpoints, the one written first first (publish sequence, then step)."""
    return sorted(list_checkpoints(root), key=lambda p: (_sequence(p), step_of(p)))


def latest_name(root: Path) -> str | None:
    """The finished checkpoint ``latest`` names, or None (no pointer, an empty one, or one naming nothing)."""
    pointer = checkpoint_dir(root) / LATEST
    name = pointer.read_text().strip() if pointer.is_file() else ""
    return name if name and (checkpoint_dir(root) / name).is_dir() else None


def step_of(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named checkpoint-<step>.")
    return int(match.group(1))


# ----- resume ----------------------------------------------------------------------------------------------------
def resume_candidates(resume: str, root: Path) -> tuple[list[Path], list[str]]:
    """The checkpoints to try, in order, and why others were passed over. ``latest``: the one it names, then every
    other finished checkpoint, newest first; a path: that folder alone."""
    if resume != LATEST:
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{resume!r} is not a finished checkpoint folder (no trainer_state.json).")
        return [path], []
    folder, skipped = checkpoint_dir(root), []
    pointer = folder / LATEST
    name = pointer.read_text().strip() if pointer.is_file() else None
    if name == "":
        skipped.append(f"{pointer} is empty")
    elif name is not None and not (folder / name).is_dir():
        skipped.append(f"{pointer} names {name}, which does not exist")
    named = [folder / name] if name and (folder / name).is_dir() else []
    others = [p for p in reversed(by_recency(root)) if p not in named]
    if not named and not others:
        raise FileNotFoundError(f"Nothing to resume: {folder} has no finished checkpoint{_reasons(skipped)}. "
                                f"{start_again(root)}")  # fmt: skip
    return named + others, skipped


def _reasons(skipped: list[str]) -> str:
    return f" ({'; '.join(skipped)})" if skipped else ""


def start_again(root: Path) -> str:
    """The advice when ``root`` holds no finished checkpoint to resume from (never resume=latest: it would fail)."""
    if not previous_run(root):
        return f"Start a new run in {root} without resume."
    return f"Start again with overwrite=true (deletes the previous run in {root}) or choose another output_dir."


def verify(path: Path) -> int:
    """Cheap integrity checks of a finished checkpoint before loading it; returns its step. Every safetensors file's
    header must cover the file and every torch zip archive must end with its directory (both fail when truncated);
    a :class:`CheckpointError` names the file and the cause."""
    state_file = Path(path) / "trainer_state.json"
    try:
        step = int(json.loads(state_file.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{state_file}: unreadable ({error})") from error
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            check_file(file)
    return step


def check_file(file: Path) -> None:
    """Raise :class:`CheckpointError` naming ``file`` when it is a truncated or corrupt safetensors or zip file."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt"):
                pass
        elif _magic(file) == b"PK\x03\x04":  # torch.save's zip format (optimizer, RNG, custom states)
            with zipfile.ZipFile(file) as archive:
                archive.infolist()
    except (SafetensorError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{file}: {error} (a truncated or corrupt file)") from error


def _magic(file: Path) -> bytes:
    with open(file, "rb") as handle:
        return handle.read(4)


# ----- disk full -------------------------------------------------------------------------------------------------
_NO_SPACE = ("no space left on device", "os error 28", "storagefull", "unexpected pos")


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` or an exception it wraps is a full disk: ENOSPC or EDQUOT, safetensors' wrapped I/O error,
    or torch's zip writer's short write ("unexpected pos")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(marker in str(error).lower() for marker in _NO_SPACE):
            return True
        error = error.__cause__ or error.__context__
    return False


def no_space(root: Path, tmp: Path, step: int) -> NoSpaceLeft:
    """Remove the half-written ``tmp`` and return the error to raise, naming the device's path and what is intact."""
    shutil.rmtree(tmp, ignore_errors=True)
    latest = latest_name(root)
    intact = f"{latest} is intact" if latest else "no earlier checkpoint exists"
    then = "resume=latest" if latest else "start again with overwrite=true"
    return NoSpaceLeft(
        errno.ENOSPC,
        f"No space left on the device holding {checkpoint_dir(root)} while writing checkpoint-{step}; removed the "
        f"partial {tmp.name}; {intact}. Free some space (or lower checkpoints_total_limit), then {then}.",
    )


# ----- the output folder -----------------------------------------------------------------------------------------
def previous_run(root: Path) -> list[str]:
    """What ``root`` holds besides the lock, ``logs`` and an empty ``checkpoints`` or ``metrics.jsonl`` (all that a
    run leaves when it stops before its first log line): a previous run's results, or anything else."""
    if not Path(root).is_dir():
        return []
    found = []
    for entry in sorted(Path(root).iterdir()):
        empty = (entry.is_dir() and not any(entry.iterdir())) or (entry.is_file() and entry.stat().st_size == 0)
        if entry.name in (LOCK, "logs") or (entry.name in ("checkpoints", METRICS) and empty):
            continue
        found.append(entry.name)
    return found


def prepare_output_dir(root: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse an ``output_dir`` that holds a previous run unless the run resumes or ``overwrite`` is set, which
    deletes the previous run's outputs (:data:`RUN_OUTPUTS`) first."""
    found = previous_run(root)
    if not found or resume:
        return
    if not overwrite:
        if not list_checkpoints(root):  # resume=latest would fail: never point there
            raise ConfigError(
                f"output_dir {root} holds a previous run ({', '.join(found)}) without a finished checkpoint to "
                f"resume from. {start_again(root)}"
            )
        raise ConfigError(
            f"output_dir {root} holds a previous run ({', '.join(found)}); continue it with resume=latest, start "
            "over with overwrite=true (deletes its checkpoints, metrics and pipeline), or choose another output_dir."
        )
    for name in RUN_OUTPUTS:
        path = Path(root) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    warnings.warn(f"overwrite=true: deleted the previous run's {', '.join(found)} in {root}.", stacklevel=4)


def truncate_metrics(root: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step``: a resumed run logs the later steps again (a half-written
    last line goes too)."""
    path = Path(root) / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(METRICS + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class RunLock:
    """``output_dir/.lock``: one run per output folder. It holds the owner's pid and hostname and is created
    atomically (``O_CREAT | O_EXCL``). A lock whose process is gone (same host) is stale and taken over with a
    warning; a live one, or one of another host, is a :class:`RunLocked` error naming its pid."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            self._take_over_if_stale()
        raise RunLocked(f"{self.path}: another process keeps taking this lock; is a second run starting?")

    def release(self) -> None:
        """Remove the lock if this object holds it (idempotent)."""
        if self.held:
            self.held = False
            with contextlib.suppress(OSError):
                if self._owner() == (os.getpid(), socket.gethostname()):
                    self.path.unlink()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(), "started": time.time()}))
        return True

    def _owner(self) -> tuple[int, str] | None:
        try:
            data = json.loads(self.path.read_text())
            return int(data["pid"]), str(data["hostname"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _take_over_if_stale(self) -> None:
        owner = self._owner()
        if owner is None:  # empty or unreadable: stale unless a process is writing it right now
            with contextlib.suppress(OSError):
                if time.time() - self.path.stat().st_mtime < 10:
                    raise RunLocked(f"{self.path}: another run is taking this output_dir right now.")
        pid, host = owner or (0, "an unknown host")
        if owner is not None and (host != socket.gethostname() or _alive(pid)):
            raise RunLocked(
                f"output_dir {self.path.parent} is in use by process {pid} on {host} (lock {self.path}); wait for "
                f"that run to end or choose another output_dir. If it is gone, delete {self.path}."
            )
        warnings.warn(
            f"{self.path}: taking over the stale lock of process {pid} on {host}, which is no longer running.",
            stacklevel=5,
        )
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
