"""Validation sampling during training: fixed prompts and seed, a PNG grid per run, TensorBoard images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import ValidationConfig


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side, ``columns`` per row (default: all in one row)."""
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


class Validator:
    """Builds a :class:`~dit.pipelines.TextToImagePipeline` around the training transformer once, then samples."""

    def __init__(self, config: ValidationConfig, output_dir: Path, scheduler=None):
        if not config.prompts:
            raise ValueError("validation.every > 0 needs validation.prompts.")
        if config.pipeline is None:
            raise ValueError(
                "validation.every > 0 needs validation.pipeline (a folder with tokenizer, text_encoder, vae)."
            )
        self.config, self.folder = config, Path(output_dir) / "validation"
        self.scheduler = scheduler  # the objective's sampler (None: the pipeline's default, DPM-Solver for ε)
        self._parts = None

    def _components(self, device: torch.device) -> dict:
        if self._parts is None:
            from .extract import load_encoders

            tokenizer, text_encoder, vae = load_encoders(self.config.pipeline, device)
            self._parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae}
        return self._parts

    @torch.no_grad()
    def run(self, transformer: torch.nn.Module, step: int) -> tuple[Path, np.ndarray]:
        """Sample every prompt with the validation seed; returns the grid's path and its (H, W, 3) uint8 array."""
        from dit.pipelines import TextToImagePipeline

        cfg, device = self.config, next(transformer.parameters()).device
        pipe = TextToImagePipeline(transformer=transformer, scheduler=self.scheduler, **self._components(device))
        pipe.set_progress_bar_config(disable=True)
        was_training = transformer.training
        transformer.eval()
        images = pipe(
            cfg.prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=cfg.height,
            width=cfg.width, generator=torch.Generator().manual_seed(cfg.seed),
        ).images  # fmt: skip
        transformer.train(was_training)
        grid = image_grid(images)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:07d}.png"
        grid.save(path)
        return path, np.asarray(grid)
