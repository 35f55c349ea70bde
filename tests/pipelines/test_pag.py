"""diffusers' PixArtSigmaPAGPipeline with our transformer: the images diffusers' PixArtTransformer2DModel gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPAGPipeline

from dit.nn.attention import DiTAttnProcessor
from tests.tiny import SIGMA, diffusers_and_ours, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left"


def _pipe(transformer, layers) -> PixArtSigmaPAGPipeline:
    parts = dict(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae())
    return PixArtSigmaPAGPipeline(
        transformer=transformer, scheduler=DPMSolverMultistepScheduler(), pag_applied_layers=layers, **parts
    )


def _run(pipe, **kwargs) -> np.ndarray:
    kwargs = dict(num_inference_steps=3, output_type="np", clean_caption=False, max_sequence_length=12,
                  use_resolution_binning=False, generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
    return pipe(PROMPT, **kwargs).images


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5], ids=["pag-only", "pag-and-cfg"])
@pytest.mark.parametrize("layers", ["blocks.1", ["transformer_blocks.0", "blocks.1"]], ids=["one", "two"])
def test_pag_pipeline_gives_diffusers_images(layers, guidance_scale):
    reference, ours = diffusers_and_ours(SIGMA)
    expected = _run(_pipe(reference, layers), guidance_scale=guidance_scale, pag_scale=3.0)
    pipe = _pipe(ours, layers)
    actual = _run(pipe, guidance_scale=guidance_scale, pag_scale=3.0)
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    without_pag = _run(pipe, guidance_scale=guidance_scale, pag_scale=0.0)
    assert np.abs(actual - without_pag).max() > 1e-3  # PAG changed the images
    assert all(type(p) is DiTAttnProcessor for p in ours.attn_processors.values())  # restored after the call
