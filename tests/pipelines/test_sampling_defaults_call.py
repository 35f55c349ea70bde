"""A call without num_inference_steps / guidance_scale samples at the folder's sampling_defaults.json (diffusers'
PixArtSigmaPipeline defaults without it); saving the pipeline again keeps the file; an LCM sets its own."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler

from dit import PixArtTransformer
from dit.microshapes.shipped import default_model
from dit.pipelines import TextToImagePipeline, load_lcm, save_lcm
from dit.pipelines.defaults import SAMPLING_DEFAULTS, save_sampling_defaults
from tests.tiny import SIGMA, randomize_, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"


def _pipe():
    torch.manual_seed(0)
    transformer = randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    return TextToImagePipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                               transformer=transformer, scheduler=None)  # fmt: skip


def _run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"output_type": "np", **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved pipeline recording 3 steps at guidance 2.5."""
    folder = tmp_path_factory.mktemp("pipe")
    _pipe().save_pretrained(folder)
    save_sampling_defaults(folder, num_inference_steps=3, guidance_scale=2.5)
    return folder


def test_a_call_without_values_uses_the_folders(folder):
    pipe = TextToImagePipeline.from_pretrained(folder)
    assert pipe.sampling_defaults == {"num_inference_steps": 3, "guidance_scale": 2.5}
    image = _run(pipe)
    assert (pipe.guidance_scale, pipe.num_timesteps) == (2.5, 3)
    assert np.array_equal(image, _run(pipe, num_inference_steps=3, guidance_scale=2.5))
    assert not np.allclose(image, _run(pipe, num_inference_steps=3, guidance_scale=4.5), atol=1e-4)
    _run(pipe, guidance_scale=1.0)  # a value given wins
    assert (pipe.guidance_scale, pipe.num_timesteps) == (1.0, 3)


def test_without_the_file_diffusers_defaults(tmp_path):
    _pipe().save_pretrained(tmp_path)
    pipe = TextToImagePipeline.from_pretrained(tmp_path)
    _run(pipe, output_type="latent")
    assert (pipe.guidance_scale, pipe.num_timesteps) == (4.5, 20)  # PixArtSigmaPipeline's
    pipe.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again" / SAMPLING_DEFAULTS).exists()


def test_saving_again_keeps_the_file(folder, tmp_path):
    TextToImagePipeline.from_pretrained(folder).save_pretrained(tmp_path)
    assert json.loads((tmp_path / SAMPLING_DEFAULTS).read_text()) == {"num_inference_steps": 3, "guidance_scale": 2.5}


def test_diffusers_from_pretrained_reads_them_too(folder):
    """A pipeline diffusers' ``DiffusionPipeline.from_pretrained`` builds (not through our classmethod)."""
    pipe = super(TextToImagePipeline, TextToImagePipeline).from_pretrained(folder)
    assert type(pipe) is TextToImagePipeline and pipe.sampling_defaults["guidance_scale"] == 2.5
    assert DiffusionPipeline.from_pretrained is not TextToImagePipeline.from_pretrained


def test_set_and_checked():
    pipe = _pipe()
    pipe.sampling_defaults = {"guidance_scale": 3}
    assert pipe.sampling_defaults == {"num_inference_steps": 20, "guidance_scale": 3.0}
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        pipe.sampling_defaults = {"guidance_scale": float("nan")}
    with pytest.raises(ValueError, match="steps"):
        pipe.sampling_defaults = {"steps": 4}


def test_load_lcm_sets_the_students_defaults(tmp_path):
    student = randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    lcm = save_lcm(tmp_path / "lcm", student, LCMScheduler(), num_inference_steps=2, guidance_scale=1.0)
    pipe = load_lcm(_pipe(), lcm)
    assert pipe.sampling_defaults == {"num_inference_steps": 2, "guidance_scale": 1.0}
    _run(pipe, output_type="latent")
    assert (pipe.guidance_scale, pipe.num_timesteps) == (1.0, 2)


def test_shipped_model_samples_at_its_recorded_guidance():
    pipe = TextToImagePipeline.from_pretrained(default_model())
    recorded = json.loads((default_model() / SAMPLING_DEFAULTS).read_text())["guidance_scale"]
    assert recorded == 2.5
    image = _run(pipe, num_inference_steps=2)
    assert pipe.guidance_scale == 2.5
    assert np.array_equal(image, _run(pipe, num_inference_steps=2, guidance_scale=2.5))
