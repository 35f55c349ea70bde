"""diffusers' callback_on_step_end convention: every tensor named can be replaced and is used, diffusers' own
callbacks (SDCFGCutoffCallback) work, and the call's state is exposed as properties."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.callbacks import PipelineCallback, SDCFGCutoffCallback

from dit import PixArtTransformer
from dit.pipelines import TextToImagePipeline
from dit.pipelines.checks import SamplingValueError
from tests.tiny import SIGMA, randomize_, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    transformer = randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    pipe = TextToImagePipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def seen(pipe):
    """The text (encoder_hidden_states) of every transformer call."""
    texts = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: texts.append(kw["encoder_hidden_states"].clone()), with_kwargs=True
    )
    yield texts
    handle.remove()


def _run(pipe, steps=3, **kwargs):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=4.5, output_type="latent",
                max_sequence_length=12, generator=torch.Generator().manual_seed(0), **kwargs).images  # fmt: skip


def test_replaced_prompt_embeds_are_used(pipe, seen):
    def zero_text(pipe, i, t, tensors):
        return {"prompt_embeds": torch.zeros_like(tensors["prompt_embeds"])} if i == 0 else tensors

    _run(pipe, callback_on_step_end=zero_text, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert len(seen) == 3 and seen[0].abs().sum() > 0
    assert seen[1].abs().sum() == 0 and seen[2].abs().sum() == 0


def test_replaced_negative_prompt_embeds_replace_the_unconditional_rows(pipe, seen):
    def zero_negative(pipe, i, t, tensors):
        return {"negative_prompt_embeds": torch.zeros_like(tensors["negative_prompt_embeds"])}

    _run(pipe, callback_on_step_end=zero_negative, callback_on_step_end_tensor_inputs=["negative_prompt_embeds"])
    first, later = seen[0], seen[1]  # (2, L, C): unconditional row first
    assert later[0].abs().sum() == 0 and torch.equal(later[1], first[1])


def test_diffusers_cfg_cutoff_callback_drops_the_cfg_batch(pipe):
    batches = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        latents = _run(pipe, steps=4, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))  # after step 2
    finally:
        handle.remove()
    assert batches == [2, 2, 2, 1] and pipe.guidance_scale == 0.0 and not pipe.do_classifier_free_guidance
    assert torch.isfinite(latents).all()


def test_pipeline_callback_tensor_inputs_are_handed_out(pipe):
    class Spy(PipelineCallback):
        tensor_inputs = ["latents", "prompt_attention_mask"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.names = sorted(callback_kwargs)
            return callback_kwargs

    spy = Spy()
    _run(pipe, steps=1, callback_on_step_end=spy)
    assert spy.names == ["latents", "prompt_attention_mask"]


def test_properties_during_a_call_and_interrupt(pipe, seen):
    state = []

    def stop(pipe, i, t, tensors):
        state.append((pipe.num_timesteps, pipe.guidance_scale, pipe.do_classifier_free_guidance))
        pipe._interrupt = True
        return tensors

    _run(pipe, steps=3, callback_on_step_end=stop)
    assert state == [(3, 4.5, True)] and len(seen) == 1  # interrupted after the first step


def test_a_text_batch_that_does_not_fit_is_named(pipe):
    def one_row(pipe, i, t, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"][-1:]}  # guidance still on: the CFG batch needs 2 rows

    with pytest.raises(SamplingValueError, match="text batch has 1 rows for 1 latents"):
        _run(pipe, callback_on_step_end=one_row, callback_on_step_end_tensor_inputs=["prompt_embeds"])
