"""TextToImagePipeline with the FiT backbone: any size, flow matching with a resolution-dependent shift, extrapolation."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dit import FiTTransformer
from dit.pipelines import TextToImagePipeline
from tests.tiny import FIT, randomize_, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"
# tiny VAE 2x and patch 2: sizes in multiples of 4 px; FIT trains on a 4x4-patch grid (16 px), up to 48 tokens


def _pipe(**overrides):
    torch.manual_seed(0)
    transformer = randomize_(FiTTransformer(**{**FIT, **overrides}), std=0.05).eval()
    return TextToImagePipeline(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), transformer=transformer, scheduler=None
    )


def _run(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "np", "use_resolution_binning": False, **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


def _latent_sizes(pipe):
    """Record the latent (H, W) of every transformer call."""
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    return seen


def test_default_scheduler_is_flow_matching_with_dynamic_shift():
    scheduler = _pipe().scheduler
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert scheduler.config.use_dynamic_shifting
    assert scheduler.config.base_image_seq_len == 16 and scheduler.config.max_image_seq_len == 64


@pytest.mark.parametrize("size", [(16, 16), (16, 32), (32, 12)], ids=["square", "wide", "tall"])
def test_generates_any_size_deterministically(size):
    pipe = _pipe()
    first, again, other = (_run(pipe, seed=s, height=size[0], width=size[1]) for s in (0, 0, 1))
    assert first.shape == (1, *size, 3) and np.isfinite(first).all()
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_shift_follows_the_image_token_count():
    """mu = 0 at the 16 training tokens (no shift); at 48 tokens mu = ln 2 * (48 - 16) / (64 - 16)."""
    pipe = _pipe()
    plain = np.linspace(1.0, 1 / 1000, 4)  # FlowMatchEuler's unshifted sigmas for 4 steps
    _run(pipe, height=16, width=16, num_inference_steps=4)  # 8x8 latent -> 16 tokens
    np.testing.assert_allclose(pipe.scheduler.sigmas[:-1].numpy(), plain, rtol=1e-5)
    _run(pipe, height=24, width=32, num_inference_steps=4)  # 12x16 latent -> 48 tokens
    shift = math.exp(math.log(2) * 32 / 48)
    np.testing.assert_allclose(
        pipe.scheduler.sigmas[:-1].numpy(), shift * plain / (1 + (shift - 1) * plain), rtol=1e-5
    )
    _run(pipe, height=16, width=16, num_inference_steps=4)  # recomputed per call
    np.testing.assert_allclose(pipe.scheduler.sigmas[:-1].numpy(), plain, rtol=1e-5)


def test_unseen_size_needs_extrapolation_then_generates():
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"64 tokens, more than max_tokens=48"):
        _run(pipe, height=16, width=64, num_inference_steps=1)  # 8x32 latent: 4x16 patches, aspect ratio 1:4
    pipe.transformer.set_extrapolation("vision_ntk", logit_scale=True)
    first, again = _run(pipe, height=16, width=64), _run(pipe, height=16, width=64)
    assert first.shape == (1, 16, 64, 3) and np.isfinite(first).all() and np.array_equal(first, again)
    pipe.transformer.set_extrapolation("none", logit_scale=False)
    in_range = _run(pipe, height=8, width=64)  # 1:8, 32 tokens: within max_tokens, no extrapolation needed
    assert in_range.shape == (1, 8, 64, 3) and np.isfinite(in_range).all()


def test_binning_snaps_to_patch_multiples_not_pixart_bins():
    pipe = _pipe(sample_size=128, train_grid=[4, 4])  # 256 px: PixArt has bins there, FiT does not use them
    seen = _latent_sizes(pipe)
    image = _run(pipe, height=18, width=30, use_resolution_binning=True, num_inference_steps=1)
    assert image.shape == (1, 18, 30, 3)
    assert set(seen) == {(8, 16)}  # 16x32 px: the nearest multiples of 4 (4.5 and 7.5 round to even); a bin: ~192x320


def test_pipeline_round_trip(tmp_path):
    pipe = _pipe()
    before = _run(pipe, height=16, width=24)
    pipe.save_pretrained(tmp_path)
    loaded = TextToImagePipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer) is FiTTransformer
    assert loaded.scheduler.config.use_dynamic_shifting
    assert np.abs(_run(loaded, height=16, width=24) - before).max() <= 1e-6
