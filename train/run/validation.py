"""Validation sampling during training (fixed prompts and seed: the config's, else a sample of the run's own captions;
a captioned PNG grid per validation step, TensorBoard images), and the run's pipeline folder, with the tokenizer, text
encoder and VAE the features were extracted with."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dit.pipelines.defaults import save_sampling_defaults
from dit.pipelines.text_to_image import TextToImagePipeline

from ..config import ConfigError, TrainConfig, ValidationConfig
from ..extract.extraction import load_encoders
from ..features.base import PipelineParts
from .validation_prompts import PROMPTS_FILE, read_validation_prompts

EXTRACT_CONFIG = "extract_config.json"  # beside the shards: {"pipeline": the folder `dit extract` encoded with}
ENCODERS = ("tokenizer", "text_encoder", "vae")
MIN_CELL = 128  # smaller images are scaled up (nearest) by a whole factor to at least this side in the grid
MAX_CAPTION_LINES = 4


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side, ``columns`` per row (default: all in one row)."""
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def captioned_grid(images: list[Image.Image], captions: list[str], columns: int | None = None) -> Image.Image:
    """Images of one size side by side (``columns`` per row, default at most 5), each scaled up to at least
    :data:`MIN_CELL` px wide and with its caption written under it, wrapped to its width (at most
    :data:`MAX_CAPTION_LINES` lines)."""
    scale = max(1, math.ceil(MIN_CELL / images[0].width))
    cells = [image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in images]
    width, height = cells[0].size
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(caption, width - 8, font, measure) for caption in captions]
    _, top, _, bottom = measure.textbbox((0, 0), "Ag", font=font)
    line = bottom - top + 3
    band = max(map(len, wrapped), default=0) * line + 6
    columns = columns or min(len(cells), 5)
    rows = (len(cells) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * (height + band)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (cell, lines) in enumerate(zip(cells, wrapped)):
        x, y = (i % columns) * width, (i // columns) * (height + band)
        grid.paste(cell, (x, y))
        for j, text in enumerate(lines):
            draw.text((x + 4, y + height + 3 + j * line - top), text, fill="black", font=font)
    return grid


def _wrap(text: str, width: float, font, draw: ImageDraw.ImageDraw) -> list[str]:
    """``text`` in lines that fit ``width`` px (words longer than a line are cut), at most MAX_CAPTION_LINES."""
    lines: list[str] = []
    for word in text.split():
        while draw.textlength(word, font=font) > width and len(word) > 1:  # a word wider than the cell: cut it
            cut = max(1, int(len(word) * width / draw.textlength(word, font=font)))
            lines.append(word[:cut])
            word = word[cut:]
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > MAX_CAPTION_LINES:
        lines = lines[:MAX_CAPTION_LINES]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 3)] + "..."
    return lines


class Validator:
    """Builds a :class:`~dit.pipelines.TextToImagePipeline` around the training transformer once, then samples."""

    def __init__(self, config: ValidationConfig, output_dir: Path, scheduler=None):
        if not config.prompts:
            raise ConfigError("validation.every > 0 needs validation.prompts.")
        if config.pipeline is None:
            raise ConfigError(
                "validation.every > 0 needs validation.pipeline (a folder with tokenizer, text_encoder, vae)."
            )
        self.config, self.folder = config, Path(output_dir) / "validation"
        self.scheduler = scheduler  # the objective's sampler (None: the pipeline's default, DPM-Solver for ε)
        self._parts = None

    def _components(self, device: torch.device) -> dict:
        if self._parts is None:
            tokenizer, text_encoder, vae = load_encoders(self.config.pipeline, device)
            self._parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae}
        return self._parts

    @torch.no_grad()
    def run(self, transformer: torch.nn.Module, step: int) -> tuple[Path, np.ndarray]:
        """Sample every prompt with the validation seed; returns the grid's path and its (H, W, 3) uint8 array."""
        cfg, device = self.config, next(transformer.parameters()).device
        pipe = TextToImagePipeline(transformer=transformer, scheduler=self.scheduler, **self._components(device))
        pipe.set_progress_bar_config(disable=True)
        was_training = transformer.training
        transformer.eval()
        images = pipe(
            cfg.prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=cfg.height,
            width=cfg.width, generator=torch.Generator().manual_seed(cfg.seed),
            clean_caption=False,  # the captions as the trainer encoded them (lower-cased and stripped)
        ).images  # fmt: skip
        transformer.train(was_training)
        grid = captioned_grid(images, cfg.prompts)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:07d}.png"
        grid.save(path)
        return path, np.asarray(grid)


# ----- where the encoders come from -------------------------------------------------------------------------------
def extracted_with(data_path: str | Path) -> Path | None:
    """The pipeline folder the features in ``data_path`` were extracted with, as ``dit extract`` records it in
    ``extract_config.json``; None when there is no record (or it names a folder without the encoders)."""
    record = Path(data_path) / EXTRACT_CONFIG
    if not record.is_file():
        return None
    try:
        folder = Path(json.loads(record.read_text())["pipeline"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{record}: no readable 'pipeline' entry ({error!r}); extract the features again."
        ) from error
    if not has_encoders(folder):
        warnings.warn(
            f"{record} names {folder}, which has no {', '.join(ENCODERS)} (moved?); ignoring it.", stacklevel=2
        )
        return None
    return folder


def record_extraction(data_path: str | Path, pipeline: str | Path) -> Path:
    """Write ``extract_config.json`` in ``data_path`` naming ``pipeline`` (a folder with tokenizer/, text_encoder/
    and vae/) as the one its features were encoded with, as ``dit extract`` does; returns the file."""
    record = Path(data_path) / EXTRACT_CONFIG
    record.write_text(json.dumps({"pipeline": str(Path(pipeline).resolve())}, indent=2) + "\n")
    return record


def has_encoders(folder: str | Path) -> bool:
    return all((Path(folder) / name).is_dir() for name in ENCODERS)


def resolve_validation_prompts(config: TrainConfig) -> None:
    """With ``validation.every`` and no ``validation.prompts``, take the prompts from the captions ``dit extract``
    sampled beside the features (``validation_prompts.json``); without those, validation is off, said in one line."""
    cfg = config.validation
    if not cfg.every or cfg.prompts:
        return
    cfg.prompts = read_validation_prompts(config.data.path)
    if not cfg.prompts:
        warnings.warn(
            f"validation.every={cfg.every}: no prompts to sample (validation.prompts is not set and "
            f"{Path(config.data.path) / PROMPTS_FILE}, which `dit extract` writes, is missing); validation is off. "
            "Set validation.prompts=[...] to sample.",
            stacklevel=3,
        )
        cfg.every = 0


def resolve_validation_pipeline(config: TrainConfig) -> None:
    """With ``validation.every``, fill ``validation.prompts`` (:func:`resolve_validation_prompts`) and
    ``validation.pipeline`` from the features' records when unset; check that a pipeline given has the encoders (the
    run's pipeline folder links them too); a ConfigError says how to fix it."""
    resolve_validation_prompts(config)
    cfg = config.validation
    if cfg.every and cfg.pipeline is None:
        cfg.pipeline = str(folder) if (folder := extracted_with(config.data.path)) else None
    if cfg.every and cfg.pipeline is None:
        raise ConfigError(
            f"validation.every={cfg.every} samples with the tokenizer, text encoder and VAE the features were "
            "extracted with: set validation.pipeline=FOLDER (that pipeline), or validation.every=0. (Features that "
            f"`dit extract` wrote name it in {Path(config.data.path) / EXTRACT_CONFIG}; these have none.)"
        )
    if cfg.pipeline is not None and not has_encoders(cfg.pipeline):
        raise ConfigError(f"validation.pipeline={cfg.pipeline!r} has no {', '.join(ENCODERS)} folders.")


# ----- the run's pipeline folder ----------------------------------------------------------------------------------
def write_pipeline(
    folder: Path, parts: PipelineParts, scheduler, sampling: tuple[int, float], source: Path | None
) -> list[str]:
    """Write a pipeline folder of ``parts`` (its class, with its models, the scheduler and ``sampling_defaults.json``)
    with the tokenizer, text encoder and VAE of ``source`` linked in (relative symlinks; copies where links fail).
    Written under a temporary name, then renamed over the old one. Returns the components it lacks (all three
    encoders when ``source`` is None)."""
    from diffusers.utils import logging as diffusers_logging

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not "self.vae=None cannot be saved": the encoders are linked next
    try:
        pipe = parts.pipeline_class(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, **parts.models)
        pipe.save_pretrained(tmp)
    finally:
        diffusers_logging.set_verbosity(level)
    save_sampling_defaults(tmp, *sampling)
    missing = list(ENCODERS)
    if source is not None:
        _add_encoders(tmp, Path(source))
        missing = []
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return missing


def _add_encoders(folder: Path, source: Path) -> None:
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update(_encoder_entries(source))
    for name in ENCODERS:
        try:
            os.symlink(os.path.relpath((source / name).resolve(), folder.resolve()), folder / name)
        except OSError:  # no symlinks here (some Windows and network filesystems)
            shutil.copytree(source / name, folder / name)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _encoder_entries(source: Path) -> dict[str, list[str]]:
    """``model_index.json`` entries of the encoders: the source's own, or read from the folders' configs (a bare
    encoders folder, as the MicroShapes recipe writes)."""
    index_file = source / "model_index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        if all(isinstance(index.get(name), list) and None not in index[name] for name in ENCODERS):
            return {name: index[name] for name in ENCODERS}
    from transformers import AutoTokenizer

    text_config = json.loads((source / "text_encoder" / "config.json").read_text())
    vae_config = json.loads((source / "vae" / "config.json").read_text())
    return {
        "tokenizer": ["transformers", type(AutoTokenizer.from_pretrained(source / "tokenizer")).__name__],
        "text_encoder": ["transformers", text_config["architectures"][0]],
        "vae": ["diffusers", vae_config["_class_name"]],
    }
