"""The extraction behind ``dit extract`` (:mod:`dit.train.extract` is the command and describes what it writes):
samples read from a source, bucketed by PixArt's aspect-ratio bins, encoded by the pipeline's T5 and VAE and written
shard by shard, resumably, with a report of the broken samples and of how well the pipeline represents the data
(:mod:`dit.train.extract.checks`)."""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import PixArtImageProcessor
from PIL import Image
from tqdm.auto import tqdm

from dit.pipelines.resolution import ASPECT_RATIO_BINS, nearest_multiple

from ..run.validation_prompts import CaptionSample, read_validation_prompts, write_validation_prompts
from .checks import DataCheck, data_warning
from .control_images import CONTROL_KINDS, control_from_image, load_control_image
from .feature_writer import ControlFeatureWriter, FeatureWriter
from .progress import (
    CONFIG_FILE,
    ExtractError,
    Progress,
    check_settings,
    finished_shards,
    read_json,
    remove_unfinished,
    write_text_atomically,
)
from .sources import SOURCES, BrokenSample, Record, open_source

PIXART_BIN_RESOLUTIONS = (256, 512, 1024, 2048)
REPORT_FILE = "extract_report-p{rank}.json"
PRINTED_BROKEN = 20  # broken samples printed per process; the report lists all


# ---------------------------------------------------------------- sizes


@functools.lru_cache
def aspect_ratio_bins(resolution: int, multiple: int) -> dict[str, list[int]]:
    """PixArt's aspect-ratio bins for ``resolution`` px; another resolution gets the nearest bin set scaled to it.
    Sides are rounded to multiples of ``multiple`` (VAE factor x patch size)."""
    base = min(ASPECT_RATIO_BINS, key=lambda r: abs(math.log(resolution / r)))
    scale = resolution / base
    return {
        ratio: [nearest_multiple(h * scale, multiple), nearest_multiple(w * scale, multiple)]
        for ratio, (h, w) in ASPECT_RATIO_BINS[base].items()
    }


def bucket_of(width: int, height: int, resolution: int, bucketing: bool = True, multiple: int = 16) -> tuple[int, int]:
    """(height, width) of the aspect-ratio bin nearest to the image (:func:`aspect_ratio_bins`), or a square of
    ``resolution`` without bucketing."""
    if not bucketing:
        return resolution, resolution
    bins = aspect_ratio_bins(resolution, multiple)
    return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)


def size_multiple(pipeline: Path) -> tuple[int, int]:
    """(VAE downsampling factor, patch size) of a pipeline folder, from its configs (patch size 2 when the folder
    has no transformer): image sides must be multiples of their product."""
    vae = read_json(pipeline / "vae" / "config.json")
    transformer = read_json(pipeline / "transformer" / "config.json") or {}
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1) if vae else 8
    return factor, int(transformer.get("patch_size") or 2)


def check_resolution(resolution: int, factor: int, patch: int, bucketing: bool) -> str | None:
    """An :class:`ExtractError` for a resolution the model cannot take; a note when the bins are scaled."""
    multiple = factor * patch
    if resolution < multiple or (not bucketing and resolution % multiple):
        lower = max(multiple, resolution // multiple * multiple)
        raise ExtractError(
            f"--resolution {resolution} does not divide into patches: use a multiple of {multiple} (VAE factor "
            f"{factor} x patch size {patch}), e.g. {lower} or {lower + multiple}."
            + ("" if bucketing else f" With bucketing (no --no-bucketing) any resolution from {multiple} works.")
        )
    if bucketing and resolution not in PIXART_BIN_RESOLUTIONS:
        base = min(PIXART_BIN_RESOLUTIONS, key=lambda r: abs(math.log(resolution / r)))
        return (
            f"PixArt's aspect-ratio bins exist for {', '.join(map(str, PIXART_BIN_RESOLUTIONS))} px; --resolution "
            f"{resolution} uses the {base} px bins scaled to {resolution} px (sides multiples of {multiple}); "
            f"--no-bucketing gives square {resolution}x{resolution} crops instead."
        )
    return None


# ---------------------------------------------------------------- pixels


def cover_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Resize to cover ``height x width`` and centre-crop: (H, W, 3) uint8."""
    scale = max(height / image.height, width / image.width)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)))  # (H, W, 3)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def image_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Resize to cover ``height x width``, centre-crop, and scale to [-1, 1]: (3, H, W)."""
    return pixels_to_tensor(cover_crop(image, height, width))


# ---------------------------------------------------------------- shards


# ---------------------------------------------------------------- resumable state


# ---------------------------------------------------------------- samples


@dataclass
class Sample:
    """A record ready to encode: its pixels (and control pixels) cropped to its bucket."""

    index: int
    bucket: tuple[int, int]  # (height, width) in pixels
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str
    control: torch.Tensor | None  # (3, H, W) in [-1, 1]


@dataclass
class SampleSpec:
    """How a record becomes a :class:`Sample`: size, control and whether empty captions are skipped."""

    resolution: int
    bucketing: bool
    multiple: int
    control: str | None = None
    skip_empty_captions: bool = False

    def prepare(self, record: Record) -> Sample:
        """The record's sample; :class:`BrokenSample` with the reason when it cannot be used."""
        image, caption = record.load()
        if not caption and self.skip_empty_captions:
            raise BrokenSample("empty caption (--skip-empty-captions)")
        bucket = bucket_of(image.width, image.height, self.resolution, self.bucketing, self.multiple)
        pixels = cover_crop(image, *bucket)
        control = None if self.control is None else pixels_to_tensor(self._control(record, image, pixels, bucket))
        return Sample(record.index, bucket, pixels_to_tensor(pixels), caption, control)

    def _control(self, record: Record, image: Image.Image, pixels: np.ndarray, bucket) -> np.ndarray:
        if self.control in CONTROL_KINDS:
            return control_from_image(pixels, self.control)
        return cover_crop(load_control_image(Path(self.control), record.name, image.size), *bucket)


class Batcher:
    """Collects samples per bucket and encodes them in batches of ``batch_size`` that never cross a shard
    boundary, so that every shard holds exactly ``shard_size`` samples (the last of each bucket fewer)."""

    def __init__(self, writer: FeatureWriter, batch_size: int):
        self.writer, self.batch_size = writer, batch_size
        self.waiting: dict[tuple[int, int], list[Sample]] = {}
        self.count = 0

    def put(self, sample: Sample) -> None:
        """Queue a sample; encode its bucket's queue once it fills a batch or the current shard."""
        waiting = self.waiting.setdefault(sample.bucket, [])
        waiting.append(sample)
        room = self.writer.shard_size - self.writer.pending_count(sample.bucket)
        if len(waiting) >= min(self.batch_size, room):
            self._encode(sample.bucket)

    def finish(self) -> None:
        """Encode what waits and write every bucket's remainder as a shard."""
        for bucket in list(self.waiting):
            self._encode(bucket)
        self.writer.flush()

    def _encode(self, bucket: tuple[int, int]) -> None:
        samples = self.waiting.pop(bucket, [])
        if not samples:
            return
        controls = () if samples[0].control is None else (torch.stack([s.control for s in samples]),)
        images, captions = torch.stack([s.image for s in samples]), [s.caption for s in samples]
        self.writer.add(bucket, images, captions, *controls, indices=[s.index for s in samples])
        self.count += len(samples)


# ---------------------------------------------------------------- the run


def load_encoders(pipeline: str | Path, device: torch.device) -> tuple:
    """(tokenizer, text_encoder, vae) from a pipeline folder, in eval mode on ``device``."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    root = Path(pipeline)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(root / "text_encoder").to(device).eval()
    vae = AutoencoderKL.from_pretrained(root / "vae").to(device).eval()
    return tokenizer, text_encoder, vae


def _check_arguments(source: str, path: Path, pipeline: Path, control: str | None, **counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ExtractError(f"--{name.replace('_', '-')} {value!r}: it must be a positive integer.")
    if source not in SOURCES:
        raise ExtractError(f"Unknown --source {source!r}; choose one of {', '.join(SOURCES)}.")
    if not path.exists():
        raise ExtractError(f"The data {path} does not exist.")
    missing = [part for part in ("tokenizer", "text_encoder", "vae") if not (pipeline / part).is_dir()]
    if missing:
        raise ExtractError(f"--pipeline {pipeline} lacks {', '.join(missing)}/: give a diffusers pipeline folder.")
    if control is not None and control not in CONTROL_KINDS and not Path(control).is_dir():
        raise ExtractError(f"--control {control}: neither {' nor '.join(CONTROL_KINDS)}, nor a folder of images.")
    next(iter(open_source(source, path)), None)  # a source that cannot be opened fails before anything is written


def _report_broken(report: dict, record: Record, err: BrokenSample) -> None:
    entry = {"index": record.index, "key": record.key, "line": record.line, "reason": str(err)}
    report["broken_samples"].append({k: v for k, v in entry.items() if v is not None})
    report["broken"] += 1
    if report["broken"] <= PRINTED_BROKEN:
        where = f"metadata.jsonl line {record.line}, " if record.line else ""
        tqdm.write(f"skipped broken sample {record.key} ({where}record {record.index}): {err}")


def _run(records: Iterator[Record], done: set[int], spec: SampleSpec, batcher: Batcher, report: dict, bar,
         captions: CaptionSample | None = None, check: DataCheck | None = None) -> None:  # fmt: skip
    for record in tqdm(records, desc="extract", unit=" images", disable=not bar):
        report["records"] += 1
        if record.index in done:
            report["resumed"] += 1
            continue
        try:
            sample = spec.prepare(record)
        except BrokenSample as err:
            _report_broken(report, record, err)
            continue
        size = f"{sample.bucket[0]}x{sample.bucket[1]}"
        report["buckets"][size] = report["buckets"].get(size, 0) + 1
        report["empty_captions"] += not sample.caption
        if captions is not None:
            captions.add(sample.caption)
        if check is not None:
            check.observe(sample.caption, sample.image)
        batcher.put(sample)
    batcher.finish()
    report["written"] = batcher.count


def _control_writer() -> type[FeatureWriter]:
    return ControlFeatureWriter


def _resume(out: Path, rank: int, world: int, main: bool) -> tuple[Progress, set[int]]:
    """This process's progress, and the records already in finished shards (of every process); deletes this
    process's unfinished shards (the main process also those of ranks beyond the world size)."""
    shards = finished_shards(out)
    removed = remove_unfinished(out, set(shards), lambda r: r == rank or (main and r >= world))
    if removed:
        print(f"Removed {len(removed)} unfinished shard file(s) of an interrupted run: {', '.join(removed)}")
    return Progress(out, rank), {i for indices in shards.values() for i in indices}


def extract(
    source: str,
    path: str | Path,
    pipeline: str | Path,
    out: str | Path,
    resolution: int = 256,
    max_length: int = 120,
    batch_size: int = 8,
    shard_size: int = 1024,
    bucketing: bool = True,
    control: str | None = None,
    skip_empty_captions: bool = False,
) -> dict:
    """Extract features from ``path`` (a ``source``) with the tokenizer, T5 and VAE of a pipeline folder into
    ``out``, resuming a run that stopped there (see the module docstring); returns this process's report.

    Args:
        control: ``"silhouette"`` or ``"edges"`` (computed from each image), or a folder with one control image
            per image under the same file name: the shards then hold ``control_latent`` for ControlNet training.
        skip_empty_captions: treat empty captions as broken instead of keeping them as unconditional samples.
    """
    from accelerate import PartialState

    out, path, pipeline = Path(out), Path(path), Path(pipeline)
    _check_arguments(source, path, pipeline, control, resolution=resolution, max_length=max_length,
                     batch_size=batch_size, shard_size=shard_size)  # fmt: skip
    control = control if control is None or control in CONTROL_KINDS else str(Path(control).resolve())
    settings = {"pipeline": str(pipeline.resolve()), "resolution": resolution, "max_length": max_length,
                "source": source, "data": str(path.resolve()), "bucketing": bucketing, "control": control}  # fmt: skip
    check_settings(out, settings)
    factor, patch = size_multiple(pipeline)
    note = check_resolution(resolution, factor, patch, bucketing)
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU: several processes run over gloo
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    encoders = load_encoders(pipeline, state.device)  # a broken pipeline fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if main:
        write_text_atomically(out / CONFIG_FILE, json.dumps(settings, indent=2))
        if note:
            print(note)
    progress, done = _resume(out, rank, world, main)
    writer_class = FeatureWriter if control is None else _control_writer()
    writer = writer_class(out, *encoders, max_length, shard_size, rank)
    writer.shards, writer.on_shard = progress.next_number(), progress.add
    if main:
        writer.write_null_caption()
    report = {"rank": rank, "world_size": world, "records": 0, "resumed": 0, "written": 0, "broken": 0,
              "empty_captions": 0, "buckets": {}, "broken_samples": []}  # fmt: skip
    records = (r for r in open_source(source, path) if r.index % world == rank)
    spec = SampleSpec(resolution, bucketing, factor * patch, control, skip_empty_captions)
    captions = CaptionSample(prompts=read_validation_prompts(out)) if main else None  # validation's prompts
    check = DataCheck()  # can the pipeline represent this data? (train/extract/checks.py)
    _run(records, done, spec, Batcher(writer, batch_size), report, bar=main, captions=captions, check=check)
    report.update(check.results(writer.tokenizer, writer.vae, max_length))
    warning = data_warning(report, str(pipeline))
    if main and warning:
        print(warning, file=sys.stderr)
    if main:
        write_validation_prompts(out, captions)
    write_text_atomically(out / REPORT_FILE.format(rank=rank), json.dumps(report, indent=2))
    return report
