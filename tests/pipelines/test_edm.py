"""TextToImagePipeline with diffusers' EDM schedulers (a network that outputs EDM's F, fed c_noise = ln(sigma) / 4),
MicroDiT's text conditioning (its all-zero null caption, no text mask), and the scheduler a transformer that records
``prediction_type="edm"`` gets by default."""

import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from dit import MicroDiTOriginalTransformer, PixArtTransformer
from dit.models.capabilities import capability
from dit.pipelines import TextToImagePipeline
from dit.pipelines.schedulers import (
    EDM_SETTINGS,
    default_scheduler,
    edm_scheduler,
    initial_noise_sigma,
    prediction_of,
    scheduler_prediction,
)
from tests.tiny import SIGMA, assert_fp32_close, randomize_, tiny_backbone, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left"
SAMPLERS = {"euler": EDMEulerScheduler, "dpmsolver": EDMDPMSolverMultistepScheduler}


def _transformer(**capabilities) -> PixArtTransformer:
    """A tiny PixArt (any backbone embeds whatever timestep it gets) with capabilities set on the instance."""
    torch.manual_seed(0)
    transformer = randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    for name, value in capabilities.items():
        setattr(transformer, name, value)
    return transformer


def _pipe(transformer, scheduler) -> TextToImagePipeline:
    pipe = TextToImagePipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                               transformer=transformer, scheduler=scheduler)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _spy(transformer) -> list[dict]:
    """Record every transformer call's inputs and output."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({"x": args[0], **kwargs, "out": output[0]})

    transformer.register_forward_hook(hook, with_kwargs=True)
    return calls


# ----- the schedulers' preconditioning is EDM's ---------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_scheduler_preconditioning_is_edms_at_microdits_sigma_data(sampler):
    """c_in, c_noise and denoised = c_skip x + c_out F with sigma_data 0.9, against the formulas written out."""
    scheduler = edm_scheduler(sampler)
    assert type(scheduler) is SAMPLERS[sampler] and scheduler.config.sigma_data == 0.9
    x, out = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for sigma in (0.002, 0.3, 0.9, 2.0, 80.0):
        sd2 = 0.81
        c_skip, c_out, c_in = (
            sd2 / (sigma**2 + sd2),
            sigma * 0.9 / math.sqrt(sigma**2 + sd2),
            1 / math.sqrt(sigma**2 + sd2),
        )
        torch.testing.assert_close(scheduler.precondition_outputs(x, out, sigma), c_skip * x + c_out * out)
        torch.testing.assert_close(scheduler.precondition_inputs(x, sigma), c_in * x)
        assert math.isclose(scheduler.precondition_noise(sigma).item(), math.log(sigma) / 4, rel_tol=1e-6)


def test_initial_noise_is_edms_first_sigma():
    """EDM starts at x ~ N(0, sigma_max^2) (MicroDiT's sampler: noise * t_steps[0]); diffusers' init_noise_sigma is
    sqrt(sigma_max^2 + 1)."""
    for sampler in SAMPLERS:
        scheduler = edm_scheduler(sampler)
        scheduler.set_timesteps(5)
        assert initial_noise_sigma(scheduler) == pytest.approx(80.0, rel=1e-6)
        assert scheduler.init_noise_sigma == pytest.approx(math.sqrt(80.0**2 + 1))
    euler = edm_scheduler("euler")
    euler.set_timesteps(sigmas=torch.tensor([0.5, 1.0]))  # a ramp: sigma_max ... sigma_min at its ends
    assert initial_noise_sigma(euler) == pytest.approx(float(euler.sigmas[0]))
    assert initial_noise_sigma(default_scheduler(_transformer())) == 1.0  # PixArt's DPM-Solver: unit noise


# ----- sampling ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_both_edm_schedulers_sample_with_float_and_negative_timesteps(sampler):
    transformer = _transformer()
    calls = _spy(transformer)
    pipe = _pipe(transformer, edm_scheduler(sampler))
    images = pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    timesteps = torch.stack([call["timestep"][0] for call in calls])  # one CFG batch per step
    assert len(calls) == 4 and timesteps.dtype == torch.float32
    torch.testing.assert_close(timesteps, pipe.scheduler.timesteps)
    assert timesteps[0] > 1 and timesteps[-1] < 0  # ln(80)/4 down to ln(0.002)/4
    assert all(call["timestep"].shape == (2,) for call in calls)  # the CFG batch: unconditional and conditional


def test_each_euler_step_is_edms():
    """Every step: the network gets c_in x and ln(sigma)/4, and x moves by (sigma' - sigma)(x - D)/sigma with
    D = c_skip x + c_out F (EDM's Euler step, sigma_data 0.9), F the network's output."""
    transformer = _transformer()
    calls = _spy(transformer)
    pipe = _pipe(transformer, edm_scheduler("euler"))
    after = []

    def keep(pipe, i, t, tensors):
        after.append(tensors["latents"].clone())
        return tensors

    pipe(PROMPT, num_inference_steps=5, guidance_scale=1.0, height=16, width=16, output_type="latent",
         generator=torch.Generator().manual_seed(1), callback_on_step_end=keep)  # fmt: skip
    sigmas = pipe.scheduler.sigmas.tolist()
    for i, call in enumerate(calls):
        sigma, following = sigmas[i], sigmas[i + 1]
        c_in = 1 / math.sqrt(sigma**2 + 0.81)
        x = call["x"] / c_in  # the latents this step started from
        if i > 0:
            assert_fp32_close(x, after[i - 1])
        assert call["timestep"][0].item() == pytest.approx(math.log(sigma) / 4, rel=1e-6)
        denoised = 0.81 / (sigma**2 + 0.81) * x + sigma * 0.9 / math.sqrt(sigma**2 + 0.81) * call["out"][:, :4]
        assert_fp32_close(after[i], x + (following - sigma) * (x - denoised) / sigma)
    assert sigmas[-1] == 0.0 and len(calls) == 5


# ----- MicroDiT's text conditioning ---------------------------------------------------------------------------
def _microdit() -> MicroDiTOriginalTransformer:
    """The faithful MicroDiT class, tiny: its null caption is all zeros and it reads no text mask."""
    torch.manual_seed(0)
    cls, config = tiny_backbone("tiny-microdit-original")
    return randomize_(cls(**config), std=0.05).eval()


def test_microdits_zero_null_caption_reaches_it_without_a_mask():
    """MicroDiT's unconditional branch is all-zero caption features (not the encoding of ""), every token of the
    prompt (padding included, as the original reads all 77 CLIP tokens) and no mask, sampled with EDM."""
    transformer = _microdit()
    assert capability(transformer, "has_null_caption") and not capability(transformer, "uses_text_mask")
    calls = _spy(transformer)
    pipe = _pipe(transformer, edm_scheduler("euler"))
    pipe(PROMPT, num_inference_steps=2, guidance_scale=4.0, height=16, width=16, output_type="latent",
         max_sequence_length=16, generator=torch.Generator().manual_seed(0))  # fmt: skip
    text = calls[0]["encoder_hidden_states"]  # (2, L, C): unconditional row first
    assert text.shape[1] == 16  # no padding trimmed
    assert torch.count_nonzero(text[0]) == 0 and torch.count_nonzero(text[1]) > 0
    assert all(call["encoder_attention_mask"] is None for call in calls)
    encoded, mask = pipe._encode_text([PROMPT], 16, "cpu")
    assert_fp32_close(text[1], encoded[0].detach())
    assert not mask.all()  # the prompt has padding, which the model reads


@pytest.mark.parametrize("uses_text_mask", [True, False])
def test_a_transformer_without_a_text_mask_reads_every_token(uses_text_mask):
    """The same call on a PixArt (no null caption: the unconditional branch is the encoded "") passes the mask and
    trims the padding to 64 tokens, unless the transformer says it uses no text mask."""
    transformer = _transformer(uses_text_mask=uses_text_mask)
    calls = _spy(transformer)
    pipe = _pipe(transformer, edm_scheduler("euler"))
    pipe(PROMPT, num_inference_steps=1, guidance_scale=4.0, height=16, width=16, output_type="latent",
         max_sequence_length=100)  # fmt: skip
    text, mask = calls[0]["encoder_hidden_states"], calls[0]["encoder_attention_mask"]
    assert torch.count_nonzero(text[0]) > 0  # "" encoded
    assert (mask is None) == (not uses_text_mask)
    assert text.shape[1] == (64 if uses_text_mask else 100)


# ----- the default scheduler of an EDM-trained transformer -------------------------------------------------------
def test_a_transformer_recording_edm_gets_an_edm_scheduler():
    transformer = _transformer()
    transformer.register_to_config(prediction_type="edm")  # as the trainer records an objective.name=edm run
    scheduler = default_scheduler(transformer)
    assert isinstance(scheduler, EDMDPMSolverMultistepScheduler) and prediction_of(scheduler) == "edm"
    assert {k: scheduler.config[k] for k in EDM_SETTINGS} == EDM_SETTINGS
    assert scheduler.config.prediction_type == "epsilon"  # diffusers' name for EDM's c_out: the network is F
    pipe = _pipe(transformer, None)
    assert isinstance(pipe.scheduler, EDMDPMSolverMultistepScheduler)
    v = EDMEulerScheduler(prediction_type="v_prediction")
    assert prediction_of(v) == "edm_v_prediction"
    # a pipeline folder's scheduler_config.json says the same without building the scheduler
    saved = dict(scheduler.config)
    assert scheduler_prediction("EDMDPMSolverMultistepScheduler", saved) == "edm"
    assert scheduler_prediction("DPMSolverMultistepScheduler", saved) == "epsilon"


# ----- a CLIP text encoder, as MicroDiT's --------------------------------------------------------------------------
@pytest.mark.parametrize("uses_text_mask", [True, False])
def test_a_clip_text_encoder_reads_its_positions_and_no_mask_for_a_maskless_model(uses_text_mask):
    """A CLIP-like text encoder (a position table of 12 here, 77 in MicroDiT's) gets at most that many tokens from
    the default max_sequence_length of 300, and no attention mask when the transformer reads every token unmasked
    (open_clip's features are made without one)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from dit.tiny import WORDS

    config = CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=SIGMA["caption_channels"], intermediate_size=37,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12)  # fmt: skip
    clip = CLIPTextModel(config).eval()
    seen = []
    clip.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    transformer = _transformer(uses_text_mask=uses_text_mask)
    calls = _spy(transformer)
    pipe = TextToImagePipeline(tokenizer=tiny_tokenizer(), text_encoder=clip, vae=tiny_vae(), transformer=transformer,
                               scheduler=edm_scheduler("euler"))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPT, num_inference_steps=1, guidance_scale=4.0, height=16, width=16, output_type="latent")
    assert seen and all((mask is None) == (not uses_text_mask) for mask in seen)
    assert calls[0]["encoder_hidden_states"].shape[1] == 12
