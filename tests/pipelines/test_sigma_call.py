"""PixArtSigmaPipeline's call as ours: its signature and encode_prompt order, its calls giving its images, caption
cleaning, the legacy callback, and diffusers' step-end callback convention."""

import inspect
import types

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma

from dit.pipelines import ControlNetPipeline, TextToImagePipeline
from dit.pipelines.checks import SamplingValueError
from dit.pipelines.defaults import PIXART_DEFAULTS
from tests.tiny import SIGMA, diffusers_and_ours, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"
MESSY = "A large RED circle https://example.com/x.png on the left &amp; @someone"


def _parts():
    return dict(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), scheduler=DPMSolverMultistepScheduler()
    )


@pytest.fixture(scope="module")
def pipes():
    """Our pipeline and diffusers' PixArtSigmaPipeline with the very same (random) weights."""
    _, transformer = diffusers_and_ours(SIGMA)
    ours = TextToImagePipeline(transformer=transformer, **_parts())
    theirs = PixArtSigmaPipeline(transformer=transformer, **_parts())
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def _positional(signature: inspect.Signature) -> list[inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in signature.parameters.values() if p.kind in kinds]


# ----- signatures ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TextToImagePipeline, ControlNetPipeline])
def test_call_takes_pixart_sigma_arguments_in_its_order(cls):
    theirs = inspect.signature(PixArtSigmaPipeline.__call__)
    ours = inspect.signature(cls.__call__)
    assert [p.name for p in _positional(ours)] == [p.name for p in _positional(theirs)]
    resolved = {"num_inference_steps", "guidance_scale"}  # None: the folder's sampling defaults, else diffusers'
    for expected in _positional(theirs):
        default = ours.parameters[expected.name].default
        if expected.name in resolved:
            assert default is None and PIXART_DEFAULTS[expected.name] == expected.default
        else:
            assert default == expected.default, expected.name
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.parameters.values())
    extras = {"use_null_caption", "callback_on_step_end", "callback_on_step_end_tensor_inputs"}
    assert extras <= {p.name for p in ours.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_encode_prompt_takes_pixart_sigma_arguments_in_its_order():
    theirs = _positional(inspect.signature(PixArtSigmaPipeline.encode_prompt))
    ours = _positional(inspect.signature(TextToImagePipeline.encode_prompt))
    assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in theirs]
    assert [p.name for p in ours][10:12] == ["clean_caption", "max_sequence_length"]  # 10th and 11th after self


def test_callback_properties_are_declared():
    for name in ("guidance_scale", "do_classifier_free_guidance", "num_timesteps", "interrupt"):
        assert isinstance(getattr(TextToImagePipeline, name), property), name
    assert {"latents", "prompt_embeds", "negative_prompt_embeds"} <= set(TextToImagePipeline._callback_tensor_inputs)


# ----- diffusers' calls give diffusers' images --------------------------------------------------------------
def _sigma_keywords(seed=0, **overrides):
    """A keyword call of PixArtSigmaPipeline naming every argument it has."""
    kwargs = dict(
        prompt=PROMPT, negative_prompt="", num_inference_steps=3, timesteps=None, sigmas=None, guidance_scale=4.5,
        num_images_per_prompt=2, height=16, width=16, eta=0.0, generator=torch.Generator().manual_seed(seed),
        latents=None, prompt_embeds=None, prompt_attention_mask=None, negative_prompt_embeds=None,
        negative_prompt_attention_mask=None, output_type="np", return_dict=True, callback=None, callback_steps=1,
        clean_caption=True, use_resolution_binning=False, max_sequence_length=12,
    )  # fmt: skip
    return {**kwargs, **overrides}


def test_keyword_call_with_every_argument_gives_diffusers_images(pipes):
    ours, theirs = pipes
    recorded = {"ours": [], "theirs": []}

    def recorder(key):
        return lambda step, t, latents: recorded[key].append((step, int(t), latents.clone()))

    expected = theirs(**_sigma_keywords(callback=recorder("theirs"), callback_steps=2)).images
    actual = ours(**_sigma_keywords(callback=recorder("ours"), callback_steps=2)).images
    assert actual.shape == expected.shape == (2, 16, 16, 3)
    assert np.abs(actual - expected).max() <= 1e-5
    assert [(s, t) for s, t, _ in recorded["ours"]] == [(s, t) for s, t, _ in recorded["theirs"]] != []
    assert [s for s, _, _ in recorded["ours"]] == [0, 2]  # every callback_steps-th step
    for (_, _, a), (_, _, b) in zip(recorded["ours"], recorded["theirs"]):
        assert torch.allclose(a, b, atol=1e-5)


def test_positional_call_gives_diffusers_images(pipes):
    ours, theirs = pipes
    names = [p.name for p in _positional(inspect.signature(PixArtSigmaPipeline.__call__))][1:]  # without self
    images = []
    for pipe in (theirs, ours):
        kwargs = _sigma_keywords(num_images_per_prompt=1)
        images.append(pipe(*[kwargs[name] for name in names]).images)
    assert np.abs(images[1] - images[0]).max() <= 1e-5


def test_unknown_keyword_arguments_are_ignored_as_diffusers_ignores_them(pipes):
    ours, theirs = pipes
    expected = theirs(**_sigma_keywords(), not_an_argument=3).images
    assert np.abs(ours(**_sigma_keywords(), not_an_argument=3).images - expected).max() <= 1e-5


def test_encode_prompt_positional_call_gives_diffusers_embeddings(pipes):
    ours, theirs = pipes
    args = (MESSY, True, "a photo", 2, torch.device("cpu"), None, None, None, None, False, 12)
    for a, b in zip(ours.encode_prompt(*args), theirs.encode_prompt(*args)):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-6)


def test_controlnet_pipeline_takes_the_positional_call():
    from dit.models import ControlNetAdapter

    _, transformer = diffusers_and_ours(SIGMA)
    adapter = ControlNetAdapter.from_transformer(transformer, num_blocks=1).eval()
    pipe = ControlNetPipeline(transformer=transformer, controlnet=adapter, **_parts())
    pipe.set_progress_bar_config(disable=True)
    names = [p.name for p in _positional(inspect.signature(PixArtSigmaPipeline.__call__))][1:]
    kwargs = _sigma_keywords(num_images_per_prompt=1)
    control = np.zeros((16, 16), dtype=np.uint8)
    by_position = pipe(*[kwargs[name] for name in names], control_image=control).images
    by_name = pipe(**_sigma_keywords(num_images_per_prompt=1), control_image=control).images
    assert by_position.shape == (1, 16, 16, 3) and np.array_equal(by_position, by_name)
    with pytest.raises(TypeError, match="multiple values"):
        pipe(PROMPT, prompt=PROMPT, control_image=control)


# ----- clean_caption -----------------------------------------------------------------------------------------
@pytest.fixture
def stub_cleaning_libraries(monkeypatch):
    """bs4 and ftfy as diffusers' caption cleaning calls them (identity stand-ins), for a venv without them."""
    soup = types.SimpleNamespace
    monkeypatch.setattr(pipeline_pixart_sigma, "is_bs4_available", lambda: True)
    monkeypatch.setattr(pipeline_pixart_sigma, "is_ftfy_available", lambda: True)
    monkeypatch.setattr(pipeline_pixart_sigma, "BeautifulSoup", lambda text, features: soup(text=text), raising=False)
    monkeypatch.setattr(pipeline_pixart_sigma, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False)


def test_clean_caption_cleans_as_diffusers(pipes, stub_cleaning_libraries):
    ours, theirs = pipes
    cleaned = theirs._text_preprocessing(MESSY, clean_caption=True)
    assert "https" not in cleaned[0] and ours._text_preprocessing(MESSY, clean_caption=True) == cleaned
    call = _sigma_keywords(prompt=MESSY, num_images_per_prompt=1)
    expected = theirs(**call).images
    assert np.abs(ours(**_sigma_keywords(prompt=MESSY, num_images_per_prompt=1)).images - expected).max() <= 1e-5
    raw = ours(**_sigma_keywords(prompt=MESSY, num_images_per_prompt=1, clean_caption=False)).images
    assert np.abs(raw - expected).max() > 1e-3  # the cleaning changed the image


def test_clean_caption_with_the_real_libraries(pipes):
    pytest.importorskip("bs4")
    pytest.importorskip("ftfy")
    ours, theirs = pipes
    expected = theirs(**_sigma_keywords(prompt=MESSY, num_images_per_prompt=1)).images
    assert np.abs(ours(**_sigma_keywords(prompt=MESSY, num_images_per_prompt=1)).images - expected).max() <= 1e-5


def test_clean_caption_without_the_libraries_does_not_clean(pipes, monkeypatch):
    monkeypatch.setattr(pipeline_pixart_sigma, "is_bs4_available", lambda: False)
    ours, _ = pipes
    call = dict(prompt=MESSY, num_images_per_prompt=1)
    default = ours(**_sigma_keywords(**call)).images
    assert np.array_equal(default, ours(**_sigma_keywords(**call, clean_caption=False)).images)


def test_callback_steps_must_be_positive(pipes):
    with pytest.raises(SamplingValueError, match="callback_steps"):
        pipes[0](**_sigma_keywords(callback_steps=0))
