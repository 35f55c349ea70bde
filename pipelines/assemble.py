"""Writing a complete pipeline folder from its parts, with the sampling defaults its trainer chose."""

from __future__ import annotations

from pathlib import Path

from .defaults import save_sampling_defaults
from .text_to_image import TextToImagePipeline


def assemble(
    folder: Path, tokenizer, text_encoder, vae, transformer, scheduler, sampling: tuple[int, float] | None = None
) -> None:
    """Save a complete pipeline folder (safetensors only) with the sampler matching the training objective (None:
    the one the transformer's config records, :func:`~dit.pipelines.schedulers.default_scheduler`), and
    ``sampling`` = (steps, guidance scale) as its sampling defaults (:mod:`dit.pipelines.defaults`)."""
    pipe = TextToImagePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)  # fmt: skip
    pipe.save_pretrained(folder)
    if sampling is not None:
        save_sampling_defaults(folder, *sampling)
