"""DiffusionPipeline.save_pretrained's options through our pipelines (variant, max_shard_size, safe_serialization)
and from_pretrained reading them back, for every backbone and for ControlNet pipelines."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

from dit import ControlNetAdapter
from dit.pipelines import ControlNetPipeline, TextToImagePipeline
from tests.tiny import BACKBONES, randomize_, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _transformer(name: str, seed: int) -> torch.nn.Module:
    cls, config = BACKBONES[name]
    torch.manual_seed(seed)
    return randomize_(cls(**{**config, "num_layers": 3}), std=0.05).eval()


def _parts() -> dict:
    return dict(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), scheduler=None)


def _run(pipe, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "guidance_scale": 4.5, "height": 16, "width": 16, "output_type": "np",
              "use_resolution_binning": False, **kwargs}  # fmt: skip
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


def _save_main_and_variant(folder, main, other, **variant_options) -> bytes:
    """Save ``main``, then ``other`` as variant fp16 into the same folder; the main transformer weights' bytes."""
    main.save_pretrained(folder)
    main_bytes = (folder / "transformer" / WEIGHTS).read_bytes()
    other.save_pretrained(folder, variant="fp16", **variant_options)
    return main_bytes


@pytest.mark.parametrize("name", BACKBONES)
def test_variant_round_trip_keeps_the_main_weights(tmp_path, name):
    """A variant lands beside the main weights (20 KB shards here); each loads back to its own images."""
    parts = _parts()
    main = TextToImagePipeline(transformer=_transformer(name, 0), **parts)
    other = TextToImagePipeline(transformer=_transformer(name, 1), **parts)
    main_bytes = _save_main_and_variant(tmp_path, main, other, max_shard_size="20KB")
    transformer = tmp_path / "transformer"
    assert (transformer / WEIGHTS).read_bytes() == main_bytes
    assert (transformer / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert len(list(transformer.glob("diffusion_pytorch_model.fp16-*-of-*.safetensors"))) > 1

    expected_main, expected_other = _run(main), _run(other)
    assert not np.array_equal(expected_main, expected_other)
    assert np.array_equal(_run(TextToImagePipeline.from_pretrained(tmp_path)), expected_main)
    assert np.array_equal(_run(TextToImagePipeline.from_pretrained(tmp_path, variant="fp16")), expected_other)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    assert type(loaded) is TextToImagePipeline and np.array_equal(_run(loaded), expected_other)


def test_sharded_pipeline_round_trip(tmp_path):
    pipe = TextToImagePipeline(transformer=_transformer("pixart", 0), **_parts())
    pipe.save_pretrained(tmp_path, max_shard_size="20KB")
    transformer = tmp_path / "transformer"
    assert (transformer / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(transformer.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    assert not (transformer / WEIGHTS).exists()
    assert np.array_equal(_run(TextToImagePipeline.from_pretrained(tmp_path)), _run(pipe))


def test_only_the_transformer_has_the_variant(tmp_path):
    """As diffusers: components without files of the variant load their main weights."""
    main = TextToImagePipeline(transformer=_transformer("pixart", 0), **_parts())
    main.save_pretrained(tmp_path)
    other = _transformer("pixart", 1)
    other.save_pretrained(tmp_path / "transformer", variant="fp16")
    expected = _run(TextToImagePipeline(transformer=other, **_parts()))
    assert np.array_equal(_run(TextToImagePipeline.from_pretrained(tmp_path, variant="fp16")), expected)


def test_pickle_is_written_on_request_with_a_warning_and_read_back_weights_only(tmp_path):
    """As diffusers: a pipeline saved with safe_serialization=False loads back (torch.load(weights_only=True))."""
    pipe = TextToImagePipeline(transformer=_transformer("pixart", 0), **_parts())
    with pytest.warns(UserWarning, match="PixArtTransformer.*pickle"):
        pipe.save_pretrained(tmp_path, safe_serialization=False)
    transformer = tmp_path / "transformer"
    assert (transformer / "diffusion_pytorch_model.bin").is_file() and not (transformer / WEIGHTS).exists()
    assert np.array_equal(_run(TextToImagePipeline.from_pretrained(tmp_path)), _run(pipe))


def _controlnet_pipeline(transformer, seeds: list[int]) -> ControlNetPipeline:
    adapters = []
    for seed in seeds:
        torch.manual_seed(seed)
        adapter = ControlNetAdapter.from_transformer(transformer, num_blocks=2).eval()
        adapters.append(randomize_(adapter, std=0.05))
    parts = {**_parts(), "scheduler": DPMSolverMultistepScheduler()}
    return ControlNetPipeline(transformer=transformer, controlnet=adapters, **parts)


@pytest.mark.parametrize("adapters", [1, 2], ids=["one-adapter", "multi-control"])
def test_controlnet_pipeline_variant_and_shards_round_trip(tmp_path, adapters):
    transformer = _transformer("pixart", 0)
    main = _controlnet_pipeline(transformer, seeds=[1, 2][:adapters])
    other = _controlnet_pipeline(transformer, seeds=[3, 4][:adapters])
    _save_main_and_variant(tmp_path, main, other, max_shard_size="20KB")
    if adapters == 2:  # diffusers' multi-ControlNet layout: controlnet, controlnet_1
        assert (tmp_path / "controlnet_1" / WEIGHTS).is_file()
    control = [np.zeros((16, 16), dtype=np.uint8)] * adapters
    control[0][4:12, 4:12] = 255
    expected_main, expected_other = _run(main, control_image=control), _run(other, control_image=control)
    assert not np.array_equal(expected_main, expected_other)
    loaded = ControlNetPipeline.from_pretrained(tmp_path)
    assert np.array_equal(_run(loaded, control_image=control), expected_main)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    assert type(loaded) is ControlNetPipeline and np.array_equal(_run(loaded, control_image=control), expected_other)
