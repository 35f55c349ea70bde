"""The sampling every pipeline shares (dit.pipelines.sampling): classifier-free guidance on the first
``guidance_channels`` latent channels (FiT's forward_with_cfg), the conditional branch elsewhere and on a learned
variance, and ``guidance_channels`` checked and taken from the recorded sampling defaults."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from dit import ControlNetAdapter
from dit.pipelines import ControlNetPipeline
from dit.pipelines.checks import SamplingValueError
from dit.tiny import tiny_pipeline
from tests.tiny import class_pipeline

SCALE = 4.0


def _text():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, lambda **kw: pipe("a red circle", height=16, width=16, **kw)


def _control():
    base = tiny_pipeline()
    adapter = ControlNetAdapter.from_transformer(base.transformer, num_blocks=1).eval()
    parts = {name: getattr(base, name) for name in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
    pipe = ControlNetPipeline(**parts, controlnet=adapter)
    pipe.set_progress_bar_config(disable=True)
    control = np.zeros((16, 16), dtype=np.uint8)
    return pipe, lambda **kw: pipe("a red circle", control_image=control, **kw)


def _class(**overrides):
    pipe = class_pipeline(**overrides)
    return pipe, lambda **kw: pipe([1, 7], height=16, width=16, **kw)


PIPELINES = {"text": _text, "controlnet": _control, "class": _class}


def _outputs_and_steps(pipe, call, **kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The transformer's outputs (the CFG batch) and the model outputs the scheduler steps with, per step."""
    outputs, stepped = [], []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda output, *a, **kw: stepped.append(output.clone()) or step(output, *a, **kw)
    try:
        call(num_inference_steps=2, guidance_scale=SCALE, output_type="latent",
             generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
    finally:
        handle.remove()
        del pipe.scheduler.step
    return outputs, stepped


@pytest.mark.parametrize("make", PIPELINES.values(), ids=PIPELINES.keys())
def test_guidance_channels_guide_only_the_first_channels(make):
    pipe, call = make()
    outputs, stepped = _outputs_and_steps(pipe, call, guidance_channels=3)
    assert len(outputs) == len(stepped) == 2
    for output, pred in zip(outputs, stepped):
        uncond, cond = output[:, :4].chunk(2)  # (B, 4, h, w) each, unconditional rows first (PixArt: + variance)
        guided = uncond + SCALE * (cond - uncond)
        torch.testing.assert_close(pred[:, :3], guided[:, :3], rtol=0, atol=1e-6)
        assert torch.equal(pred[:, 3:], cond[:, 3:])  # the conditional prediction, not guided
        assert (guided[:, 3:] - cond[:, 3:]).abs().max() > 1e-3  # guiding it too would be another value
    outputs, every = _outputs_and_steps(pipe, call)  # None: every channel
    uncond, cond = outputs[0][:, :4].chunk(2)
    torch.testing.assert_close(every[0], uncond + SCALE * (cond - uncond), rtol=0, atol=1e-6)


def test_a_learned_variance_is_never_guided():
    """DDPM with a learned variance gets ε guided and the variance channels of the conditional branch."""
    pipe, call = _class(
        out_channels=8, prediction_type="epsilon", scheduler=DDPMScheduler(variance_type="learned_range")
    )
    outputs, stepped = _outputs_and_steps(pipe, call)
    uncond, cond = outputs[0].chunk(2)  # (B, 8, h, w)
    assert stepped[0].shape[1] == 8
    torch.testing.assert_close(stepped[0][:, :4], uncond[:, :4] + SCALE * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(stepped[0][:, 4:], cond[:, 4:])


@pytest.mark.parametrize("make", PIPELINES.values(), ids=PIPELINES.keys())
def test_recorded_guidance_channels_are_the_call_default(make):
    pipe, call = make()
    pipe.sampling_defaults = {"guidance_channels": 3}
    recorded = _outputs_and_steps(pipe, call)[1][0]
    assert torch.equal(recorded, _outputs_and_steps(pipe, call, guidance_channels=3)[1][0])
    assert not torch.equal(recorded, _outputs_and_steps(pipe, call, guidance_channels=4)[1][0])
    assert pipe.guidance_channels == 4  # the last call's


@pytest.mark.parametrize("make", PIPELINES.values(), ids=PIPELINES.keys())
@pytest.mark.parametrize("channels", [0, 5, 2.5, True, "3"])
def test_bad_guidance_channels_are_named(make, channels):
    pipe, call = make()
    with pytest.raises(SamplingValueError, match=rf"guidance_channels must be None .*<= 4 .*got {channels!r}"):
        call(num_inference_steps=1, guidance_channels=channels)
