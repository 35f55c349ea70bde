"""ClassToImagePipeline with a class-conditional FiT: any size and aspect ratio, class ids or label names, CFG with the
null class, the folder round trip (ours and diffusers' DiffusionPipeline), flow and DDPM / DDIM / DPM-Solver
schedulers with a learned sigma, callbacks, and bad values named before any work."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from dit import FiTTransformer
from dit.pipelines import ClassToImagePipeline
from dit.pipelines.checks import SamplingValueError
from dit.pipelines.defaults import save_sampling_defaults
from tests.tiny import CLASS_NAMES, FIT, class_pipeline, tiny_vae

# tiny VAE 2x and patch 2: sizes in multiples of 4 px; the tiny FiT trains on a 4x4-patch grid, up to 48 tokens


@pytest.fixture(scope="module")
def pipe():
    return class_pipeline()


def _run(pipe, labels=(1, 7), seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "np", "height": 16, "width": 16, **kwargs}
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture
def calls(pipe):
    """The class labels of every transformer call."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["class_labels"].tolist()), with_kwargs=True
    )
    yield seen
    handle.remove()


@pytest.mark.parametrize("size", [(16, 16), (16, 32), (32, 12)], ids=["square", "wide", "tall"])
def test_generates_any_size_deterministically(pipe, size):
    first, again, other = (_run(pipe, seed=s, height=size[0], width=size[1]) for s in (0, 0, 1))
    assert first.shape == (2, *size, 3) and np.isfinite(first).all()
    assert np.array_equal(first, again) and not np.allclose(first, other)


def test_names_and_ids_give_the_same_images_and_the_class_matters(pipe):
    by_id = _run(pipe, labels=[1, 7])
    assert np.array_equal(_run(pipe, labels=["goldfish", "sports car"]), by_id)
    assert np.array_equal(_run(pipe, labels=["Carassius auratus", 7]), by_id)
    assert not np.allclose(_run(pipe, labels=[2, 7])[0], by_id[0])  # same noise, another class


def test_cfg_batch_is_the_null_class_then_the_labels(pipe, calls):
    _run(pipe, labels=["goldfish", 7], num_inference_steps=1, num_images_per_label=2)
    assert calls == [[10, 10, 10, 10, 1, 1, 7, 7]]  # null class (num_classes) first; image k of label j: row j*n+k
    _run(pipe, labels=[3], num_inference_steps=1, guidance_scale=1.0)
    assert calls[-1] == [3]  # no guidance, no CFG batch


def test_the_folder_round_trip_loads_with_diffusers(pipe, tmp_path):
    before = _run(pipe, height=16, width=24)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ClassToImagePipeline"
    assert index["id2label"] == {str(k): v for k, v in CLASS_NAMES.items()}  # as diffusers' DiT folders have it
    for loaded in (DiffusionPipeline.from_pretrained(tmp_path), ClassToImagePipeline.from_pretrained(tmp_path)):
        assert type(loaded) is ClassToImagePipeline and type(loaded.transformer) is FiTTransformer
        assert loaded.labels == pipe.labels and isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
        loaded.set_progress_bar_config(disable=True)
        assert np.array_equal(_run(loaded, height=16, width=24), before)


def test_recorded_guidance_channels_are_the_default_and_kept(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    save_sampling_defaults(tmp_path, num_inference_steps=3, guidance_scale=4.0, guidance_channels=3)
    loaded = ClassToImagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.sampling_defaults == {"num_inference_steps": 3, "guidance_scale": 4.0, "guidance_channels": 3}
    default = _run(loaded, num_inference_steps=None, guidance_scale=None)
    assert np.array_equal(default, _run(pipe, guidance_scale=4.0, guidance_channels=3))
    assert not np.allclose(default, _run(pipe, guidance_scale=4.0, guidance_channels=4))  # all 4: another image
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "sampling_defaults.json").read_text())["guidance_channels"] == 3


SCHEDULERS = {
    "ddpm-learned-range": lambda: DDPMScheduler(variance_type="learned_range"),
    "ddpm-fixed": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
}


@pytest.mark.parametrize("make", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_epsilon_model_with_a_learned_sigma_samples_with_discrete_schedulers(make):
    """FiT v1's output: ε then the variance (out_channels 8). DDPM with a learned variance gets all 8 channels and
    uses them; every other scheduler gets the ε channels."""
    pipe = class_pipeline(make(), out_channels=8, prediction_type="epsilon")
    seen = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda output, *args, **kwargs: seen.append(output.shape[1]) or step(output, *args, **kwargs)
    images = _run(pipe, num_inference_steps=4, guidance_channels=3)
    learned = pipe.scheduler.config.get("variance_type") == "learned_range"
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and seen == [8 if learned else 4] * 4


def test_default_scheduler_follows_the_recorded_prediction():
    assert isinstance(class_pipeline().scheduler, FlowMatchEulerDiscreteScheduler)
    eps = class_pipeline(out_channels=8, prediction_type="epsilon").scheduler
    assert isinstance(eps, DPMSolverMultistepScheduler) and eps.config.prediction_type == "epsilon"


def test_step_callbacks_replace_latents_and_interrupt(pipe):
    steps, legacy = [], []

    def zero_last(pipe, i, t, tensors):
        steps.append(i)
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else tensors

    out = _run(pipe, output_type="latent", callback_on_step_end=zero_last,
               callback=lambda i, t, latents: legacy.append(i))  # fmt: skip
    assert steps == [0, 1, 2] and legacy == [0, 1, 2] and out.abs().sum() == 0 and pipe.num_timesteps == 3

    def stop(pipe, i, t, tensors):
        pipe._interrupt = i == 0
        return tensors

    interrupted = _run(pipe, output_type="latent", callback_on_step_end=stop)
    assert not torch.equal(interrupted, _run(pipe, output_type="latent"))


@pytest.fixture
def no_work(pipe):
    """Fails the test if the transformer or the VAE decoder runs."""

    def refuse(module, args, kwargs):
        raise AssertionError(f"{type(module).__name__} ran before the bad value was refused")

    hooks = [m.register_forward_pre_hook(refuse, with_kwargs=True) for m in (pipe.transformer, pipe.vae.decoder)]
    yield
    for hook in hooks:
        hook.remove()


BAD_VALUES = {
    "label-unknown": (dict(labels=["goldfsh"]), r"'goldfsh' is not a label .*close matches: 'goldfish'"),
    "label-shared": (dict(labels=["crane"]), r"'crane' names several classes: 3 \(crane\), 4 \(crane, bird\)"),
    "id-null": (dict(labels=[10]), r"class id 10 is outside 0\.\.9"),
    "labels-empty": (dict(labels=[]), r"class_labels must be .* non-empty list"),
    "channels-zero": (dict(guidance_channels=0), r"guidance_channels must be None .* int >= 1 and <= 4 .* got 0"),
    "channels-many": (dict(guidance_channels=5), r"guidance_channels must be .* <= 4 \(the model's latent channels"),
    "channels-float": (dict(guidance_channels=2.5), r"guidance_channels must be .* got 2.5"),
    "images-zero": (dict(num_images_per_label=0), r"num_images_per_label must be an int >= 1, got 0"),
    "guidance-nan": (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number >= 0, got nan"),
    "steps-zero": (dict(num_inference_steps=0), r"num_inference_steps must be an int >= 1, got 0"),
    "size-no-multiple": (dict(height=18, use_resolution_binning=False), r"18x16 does not divide into patches"),
    "callback-tensor": (
        dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"]),
        r"\['prompt_embeds'\] are not in \['latents'\]",
    ),  # fmt: skip
    "latents-shape": (dict(latents=torch.zeros(1, 4, 8, 8)), r"latents have shape \(1, 4, 8, 8\); expected"),
}


@pytest.mark.parametrize("kwargs, message", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_named_before_any_work(pipe, no_work, kwargs, message):
    with pytest.raises(SamplingValueError, match=message):
        _run(pipe, **kwargs)


def test_a_size_that_is_no_multiple_is_snapped_with_binning(pipe):
    assert _run(pipe, height=18, width=30, num_inference_steps=1).shape == (2, 18, 30, 3)


def test_a_model_without_classes_is_refused():
    with pytest.raises(
        ValueError, match=r"needs a class-conditional transformer \(num_classes .* TextToImagePipeline"
    ):
        ClassToImagePipeline(FiTTransformer(**FIT), tiny_vae(), None)
    with pytest.raises(
        ValueError, match=r"class-only models; this FiTTransformer also attends to text \(caption_chan"
    ):
        class_pipeline(caption_channels=32)
    with pytest.raises(ValueError, match=r"id2label key 12 is not a class id of this model \(0\.\.9\)"):
        class_pipeline(id2label={12: "far"})
