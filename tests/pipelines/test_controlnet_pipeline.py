"""ControlNetPipeline: the base pipeline exactly at scale 0, control images, guidance window, multi-control, I/O."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from dit import ControlNetAdapter, FiTTransformer, LiTTransformer, PixArtTransformer
from dit.pipelines import ControlNetPipeline, TextToImagePipeline
from dit.pipelines.controlnet import control_tensor
from tests.tiny import FIT, SIGMA, randomize_, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"
SIZES = {"square": (16, 16), "wide": (12, 20)}
CONFIGS = {PixArtTransformer: SIGMA, LiTTransformer: SIGMA, FiTTransformer: {**FIT, "absolute_position": "fractional"}}


def _parts(scheduler=True):
    """Encoders and a scheduler (None: the pipeline's default for the backbone, flow matching for FiT)."""
    scheduler = DPMSolverMultistepScheduler() if scheduler else None
    return dict(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), scheduler=scheduler)


def _transformer(cls=PixArtTransformer, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_(cls(**{**CONFIGS[cls], "num_layers": 3}), std=0.05).eval()


def _adapter(transformer, seed: int = 1, zero: bool = False, **kwargs):
    adapter = ControlNetAdapter.from_transformer(transformer, **{"num_blocks": 2, **kwargs}).eval()
    if not zero:
        torch.manual_seed(seed)
        with torch.no_grad():
            for proj in [adapter.before_proj, *(b.after_proj for b in adapter.controlnet_blocks)]:
                proj.weight.normal_(0.0, 0.3)
    return adapter


def _square(height: int = 16, width: int = 16, box=(3, 11, 4, 12)) -> np.ndarray:
    control = np.zeros((height, width), dtype=np.uint8)
    control[box[0] : box[1], box[2] : box[3]] = 255
    return control


def _run(pipe, seed: int = 0, prompt=PROMPT, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "np", "use_resolution_binning": False, **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("cls", [PixArtTransformer, LiTTransformer, FiTTransformer], ids=["pixart", "lit", "fit"])
def test_scale_zero_and_zero_init_give_the_base_pipeline_exactly(cls, size):
    transformer, parts = _transformer(cls), _parts(scheduler=cls is not FiTTransformer)
    height, width = size
    base = _run(TextToImagePipeline(transformer=transformer, **parts), height=height, width=width)
    control = _square(height, width)
    trained = ControlNetPipeline(transformer=transformer, controlnet=_adapter(transformer), **parts)
    assert np.array_equal(_run(trained, control_image=control, controlnet_conditioning_scale=0.0), base)
    fresh = ControlNetPipeline(transformer=transformer, controlnet=_adapter(transformer, zero=True), **parts)
    assert np.array_equal(_run(fresh, control_image=control), base)
    controlled = _run(trained, control_image=control)
    assert controlled.shape == (1, height, width, 3) and np.abs(controlled - base).max() > 1e-3
    other = _run(trained, control_image=_square(height, width, box=(0, 6, 0, 6)))
    assert np.abs(controlled - other).max() > 1e-4  # the control's content matters (exactly 0 if it were ignored)


def _active_steps(pipe, **kwargs) -> list[int]:
    """How many adapters each transformer call ran with."""
    counts = []

    def record(module, args, kwargs_, output):
        controls = kwargs_.get("block_controls")
        counts.append(0 if controls is None else len(controls.runs))

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        _run(pipe, **kwargs)
    finally:
        handle.remove()
    return counts


def test_control_guidance_window_counts_steps_as_diffusers():
    transformer = _transformer()
    a, b = _adapter(transformer, seed=1), _adapter(transformer, seed=2)
    pipe = ControlNetPipeline(transformer=transformer, controlnet=[a, b], **_parts())
    control = _square()
    window = dict(control_guidance_start=[0.25, 0.0], control_guidance_end=[0.75, 0.5])
    assert _active_steps(pipe, control_image=[control, control], num_inference_steps=4, **window) == [1, 2, 1, 0]
    single = ControlNetPipeline(transformer=transformer, controlnet=a, **_parts())
    steps = dict(control_image=control, num_inference_steps=4)
    assert _active_steps(single, control_guidance_start=0.5, **steps) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        _run(single, control_guidance_start=0.6, control_guidance_end=0.4, **steps)


def test_multi_control_each_with_its_own_scale():
    transformer, parts = _transformer(), _parts()
    a = _adapter(transformer)
    control = _square()
    single = _run(ControlNetPipeline(transformer=transformer, controlnet=a, **parts), control_image=control)
    pipe = ControlNetPipeline(transformer=transformer, controlnet=[a, copy.deepcopy(a)], **parts)
    split = _run(pipe, control_image=[control, control], controlnet_conditioning_scale=[0.4, 0.6])
    assert np.abs(split - single).max() <= 1e-5
    one_off = _run(pipe, control_image=[control, _square(box=(0, 4, 0, 4))], controlnet_conditioning_scale=[1.0, 0])
    assert np.array_equal(one_off, single)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 entries for 2 ControlNet adapters"):
        _run(pipe, control_image=[control, control], controlnet_conditioning_scale=[1.0, 1.0, 1.0])


def test_control_image_formats_batches_and_size():
    transformer = _transformer()
    pipe = ControlNetPipeline(transformer=transformer, controlnet=_adapter(transformer), **_parts())
    control = _square(12, 20)
    as_array = _run(pipe, control_image=control)  # height and width come from the control image
    assert as_array.shape == (1, 12, 20, 3)
    assert np.array_equal(_run(pipe, control_image=Image.fromarray(control)), as_array)
    assert np.array_equal(_run(pipe, control_image=control_tensor(control)[0]), as_array)
    prompts = [PROMPT, "a small blue square in the center, on a black background"]
    batch = _run(pipe, prompt=prompts, control_image=[control, control[::-1].copy()], num_images_per_prompt=2)
    assert batch.shape == (4, 12, 20, 3) and np.array_equal(batch[0], batch[0]) and not np.allclose(batch[0], batch[2])
    with pytest.raises(ValueError, match="control_image is 20x12 \\(WxH\\); the image to generate is 16x16"):
        _run(pipe, control_image=control, height=16, width=16)
    with pytest.raises(ValueError, match="control_image has 3 images; pass one, or one per prompt"):
        _run(pipe, prompt=prompts, control_image=[control] * 3)
    with pytest.raises(ValueError, match="needs control_image"):
        _run(pipe)
    binned = _run(pipe, control_image=_square(18, 30), use_resolution_binning=True)
    assert binned.shape == (1, 18, 30, 3)


def test_round_trips_as_a_pipeline_folder(tmp_path):
    transformer, parts = _transformer(), _parts()
    control = _square()
    single = ControlNetPipeline(transformer=transformer, controlnet=_adapter(transformer), **parts)
    before = _run(single, control_image=control)
    single.save_pretrained(tmp_path / "single")
    assert not list((tmp_path / "single").rglob("*.bin"))
    loaded = ControlNetPipeline.from_pretrained(tmp_path / "single")
    assert type(loaded.controlnet) is ControlNetAdapter
    assert np.abs(_run(loaded, control_image=control) - before).max() <= 1e-6
    TextToImagePipeline(transformer=transformer, **parts).save_pretrained(tmp_path / "base")
    adapter = ControlNetAdapter.from_pretrained(tmp_path / "single" / "controlnet")
    on_base = ControlNetPipeline.from_pretrained(tmp_path / "base", controlnet=adapter)
    assert np.abs(_run(on_base, control_image=control) - before).max() <= 1e-6
    multi = ControlNetPipeline(transformer=transformer, controlnet=[adapter, _adapter(transformer, seed=5)], **parts)
    expected = _run(multi, control_image=[control, control])
    multi.save_pretrained(tmp_path / "multi")
    again = ControlNetPipeline.from_pretrained(tmp_path / "multi")
    assert len(again.adapters) == 2
    assert np.abs(_run(again, control_image=[control, control]) - expected).max() <= 1e-6


def test_adapter_for_another_base_is_refused():
    transformer = _transformer()
    other = PixArtTransformer(**{**SIGMA, "num_layers": 2})
    with pytest.raises(ValueError, match="feeds base block 2; the transformer has only 2 blocks"):
        ControlNetPipeline(transformer=other, controlnet=_adapter(transformer), **_parts())
