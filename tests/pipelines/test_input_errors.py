"""Bad sampling values are a ValueError naming the value and the allowed range, raised before any work starts; a
pipeline folder with a missing or unexpected key, or a scheduler with an unknown prediction_type, does not load."""

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from dit import ControlNetAdapter
from dit.checkpoint import CheckpointKeyError
from dit.pipelines import ControlNetPipeline, TextToImagePipeline
from dit.tiny import tiny_pipeline

PROMPT = "a large red circle on the left, on a white background"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def no_work(pipe):
    """Fails the test if the text encoder, the transformer or the VAE runs."""

    def refuse(module, args, kwargs):
        raise AssertionError(f"{type(module).__name__} ran before the bad value was refused")

    hooks = [m.register_forward_pre_hook(refuse, with_kwargs=True) for m in (pipe.text_encoder, pipe.transformer)]
    hooks.append(pipe.vae.decoder.register_forward_pre_hook(refuse, with_kwargs=True))
    yield
    for hook in hooks:
        hook.remove()


def _call(pipe, prompt=PROMPT, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", "generator": torch.Generator().manual_seed(0), **kwargs}
    return pipe(prompt, **kwargs).images


BAD_VALUES = {
    "guidance-nan": (dict(guidance_scale=NAN), r"guidance_scale must be a finite number >= 0, got nan"),
    "guidance-inf": (dict(guidance_scale=INF), r"guidance_scale must be a finite number >= 0, got inf"),
    "guidance-negative": (dict(guidance_scale=-1.0), r"guidance_scale .* got -1"),
    "steps-zero": (dict(num_inference_steps=0), r"num_inference_steps must be an int >= 1, got 0"),
    "steps-negative": (dict(num_inference_steps=-1), r"num_inference_steps must be an int >= 1, got -1"),
    "steps-float": (dict(num_inference_steps=2.5), r"num_inference_steps must be an int >= 1, got 2.5"),
    "height-zero": (dict(height=0), r"height must be an int between 1 and 16384 pixels, got 0"),
    "width-negative": (dict(width=-16), r"width must be an int between 1 and 16384 pixels, got -16"),
    "height-huge": (dict(height=100000, width=64), r"height .* got 100000.*smaller size"),
    "tokens-huge": (dict(height=16384, width=16384), r"image tokens .* cap .*smaller size"),
    "images-zero": (dict(num_images_per_prompt=0), r"num_images_per_prompt must be an int >= 1, got 0"),
    "eta-negative": (dict(eta=-0.1), r"eta must be a number in \[0, 1\], got -0.1"),
    "eta-large": (dict(eta=1.5), r"eta must be a number in \[0, 1\], got 1.5"),
    "eta-nan": (dict(eta=NAN), r"eta must be a number in \[0, 1\], got nan"),
    "guidance-channels-zero": (dict(guidance_channels=0), r"guidance_channels must be None .* int >= 1 .* got 0"),
    "guidance-channels-many": (dict(guidance_channels=5), r"guidance_channels .* <= 4 \(the model's latent channels"),
    "prompt-empty-list": (dict(prompt=[]), r"prompt must be a string or a non-empty list of strings, got \[\]"),
    "prompt-int": (dict(prompt=5), r"prompt must be a string or a non-empty list of strings, got 5"),
    "prompt-mixed": (dict(prompt=["a cat", 3]), r"prompt must be .* got a list holding 3"),
    "latents-nan": (dict(latents=torch.full((1, 4, 8, 8), NAN)), r"latents hold NaN or infinite values"),
    "latents-inf": (dict(latents=torch.full((1, 4, 8, 8), INF)), r"latents hold NaN or infinite values"),
    "latents-shape": (dict(latents=torch.zeros(1, 4, 4, 4)), r"latents have shape \(1, 4, 4, 4\); expected"),
}


@pytest.mark.parametrize("kwargs, message", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_sampling_value_is_named_before_any_work(pipe, no_work, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _call(pipe, **kwargs)


def test_good_user_latents_and_valid_edges_still_sample(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = _call(pipe, prompt=[PROMPT, "a cat"], latents=latents, eta=1.0, guidance_scale=0.0)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_size_that_is_no_multiple_snaps_with_binning_and_is_named_without(pipe):
    assert _call(pipe, height=18, width=30).shape == (1, 18, 30, 3)  # snapped to 16x32, returned as asked
    with pytest.raises(ValueError, match=r"18x30 does not divide into patches.*multiples of 4"):
        _call(pipe, height=18, width=30, use_resolution_binning=False)


# ----- ControlNet -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def control_pipe(pipe):
    adapter = ControlNetAdapter.from_transformer(pipe.transformer, num_blocks=1).eval()
    parts = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
    control = ControlNetPipeline(**parts, controlnet=adapter)
    control.set_progress_bar_config(disable=True)
    return control


def _control(height=16, width=16):
    return np.zeros((height, width), dtype=np.uint8)


def test_two_control_images_for_one_adapter_and_one_prompt_are_refused(control_pipe, no_work):
    with pytest.raises(ValueError, match=r"control_image has 2 images; pass one, or one per prompt \(1 prompt here\)"):
        _call(control_pipe, control_image=[_control(), _control()])


def test_more_control_images_than_adapters_are_refused(pipe, no_work):
    adapters = [ControlNetAdapter.from_transformer(pipe.transformer, num_blocks=1).eval() for _ in range(2)]
    parts = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
    multi = ControlNetPipeline(**parts, controlnet=adapters)
    with pytest.raises(ValueError, match=r"control_image has 3 entries for 2 ControlNet adapters"):
        _call(multi, control_image=[_control()] * 3)


def test_one_control_image_per_prompt_is_still_taken(control_pipe):
    images = _call(control_pipe, prompt=[PROMPT, "a cat"], control_image=[_control(), _control()])
    assert images.shape == (2, 16, 16, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=0), r"height must be an int between 1"),
        (dict(guidance_scale=NAN), r"guidance_scale"),
        (dict(guidance_channels=0), r"guidance_channels must be None"),
    ],
)
def test_controlnet_call_checks_the_sampling_values_too(control_pipe, no_work, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _call(control_pipe, control_image=_control(), **kwargs)


# ----- loading ----------------------------------------------------------------------------------------------
def _edit_weights(file, drop: str | None = None, add: str | None = None):
    state = load_file(file)
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(1)
    save_file(state, file)


@pytest.mark.parametrize("component", ["vae", "text_encoder"])
@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_component_with_a_missing_or_unexpected_key_does_not_load(tmp_path, pipe, component, change):
    pipe.save_pretrained(tmp_path)
    (file,) = (tmp_path / component).glob("*.safetensors")
    key = sorted(k for k in load_file(file) if "conv_in.bias" in k or "final_layer_norm" in k)[0]
    _edit_weights(
        file, drop=key if change == "missing" else None, add="extra.weight" if change == "unexpected" else None
    )
    expected = key if change == "missing" else "extra.weight"
    with pytest.raises(CheckpointKeyError, match=rf"{component}.*\n1 {change} key\(s\): {expected}"):
        TextToImagePipeline.from_pretrained(tmp_path)


def test_complete_folder_loads_and_samples_as_saved(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    loaded = TextToImagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(_call(loaded) - _call(pipe)).max() <= 1e-6


def test_scheduler_with_an_unknown_prediction_type_is_refused(tmp_path, pipe):
    parts = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "vae", "transformer")}
    with pytest.raises(ValueError, match=r"prediction_type 'x0'.*'epsilon', 'sample', 'v_prediction'"):
        TextToImagePipeline(**parts, scheduler=DPMSolverMultistepScheduler(prediction_type="x0"))
    pipe.save_pretrained(tmp_path)
    config_file = tmp_path / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "eps"}))
    with pytest.raises(ValueError, match=r"prediction_type 'eps'"):
        TextToImagePipeline.from_pretrained(tmp_path)


def test_flow_scheduler_config_with_a_noise_prediction_type_is_refused(tmp_path, pipe):
    parts = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "vae", "transformer")}
    TextToImagePipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(tmp_path)
    config_file = tmp_path / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "epsilon"}))
    with pytest.raises(ValueError, match=r"prediction_type 'epsilon'.*FlowMatchEulerDiscreteScheduler"):
        TextToImagePipeline.from_pretrained(tmp_path)
