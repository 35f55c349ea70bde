"""The low-memory preset (dit.pipelines.low_memory): one switch that quantizes the text encoder, halves the
transformer and VAE, offloads where an accelerator is, tiles the VAE above a size; the same images as the bf16
pipeline within the stated tolerance, on load or on a loaded pipeline."""

import numpy as np
import pytest
import torch

from dit.microshapes.shipped import default_model
from dit.pipelines import ClassToImagePipeline, TextToImagePipeline
from dit.pipelines import low_memory as lm
from dit.pipelines.low_memory import OUTPUT_TOLERANCE, LowMemoryConfig
from dit.quantization import is_quantized
from tests.tiny import class_pipeline

pytest.importorskip("torchao", reason="the preset's 8-bit text encoder needs the [quantization] extra (torchao)")

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle on a white background"]


def _images(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    out = pipe(PROMPTS, num_inference_steps=10, generator=generator, output_type="np", clean_caption=False, **kwargs)
    return out.images


@pytest.fixture(scope="module")
def bf16_images():
    return _images(TextToImagePipeline.from_pretrained(default_model(), dtype=torch.bfloat16))


def test_preset_on_load_matches_bf16_within_tolerance(bf16_images):
    pipe = TextToImagePipeline.from_pretrained(default_model(), low_memory=True)
    assert is_quantized(pipe.text_encoder) and not is_quantized(pipe.transformer)
    assert pipe.transformer.dtype == pipe.vae.dtype == torch.bfloat16
    assert pipe.low_memory_config == LowMemoryConfig()
    images = _images(pipe)
    difference = np.abs(images - bf16_images).mean()
    assert 0 < difference < OUTPUT_TOLERANCE, difference  # 0 would mean the text encoder was not quantized


def test_preset_on_a_loaded_pipeline_is_the_same_as_on_load():
    on_load = _images(TextToImagePipeline.from_pretrained(default_model(), low_memory=True))
    loaded = TextToImagePipeline.from_pretrained(default_model())
    assert loaded.enable_low_memory() is loaded
    assert is_quantized(loaded.text_encoder) and loaded.transformer.dtype == torch.bfloat16
    np.testing.assert_array_equal(_images(loaded), on_load)


def test_class_pipeline_preset(tmp_path):
    class_pipeline().save_pretrained(tmp_path)
    pipe = ClassToImagePipeline.from_pretrained(tmp_path, low_memory={"dtype": torch.float16})
    assert pipe.transformer.dtype == torch.float16
    out = pipe([1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(out.images).all()


@pytest.mark.parametrize("accelerator", [None, "cuda"])
def test_offload_only_where_an_accelerator_is(tiny_pipeline_folder, monkeypatch, accelerator):
    offloaded = []
    monkeypatch.setattr(lm, "_accelerator", lambda: accelerator)
    monkeypatch.setattr(
        TextToImagePipeline, "enable_model_cpu_offload", lambda self, device=None: offloaded.append(device)
    )
    TextToImagePipeline.from_pretrained(tiny_pipeline_folder, low_memory=True)
    assert offloaded == ([] if accelerator is None else ["cuda"])
    TextToImagePipeline.from_pretrained(tiny_pipeline_folder, low_memory={"offload": False})
    assert len(offloaded) == (0 if accelerator is None else 1)


def test_vae_tiles_only_above_the_size(tiny_pipeline_folder):
    plain = TextToImagePipeline.from_pretrained(tiny_pipeline_folder, dtype=torch.bfloat16)
    tiled = TextToImagePipeline.from_pretrained(tiny_pipeline_folder, dtype=torch.bfloat16).enable_low_memory(
        text_encoder_scheme=None, vae_tile_above=32
    )
    assert tiled.vae.use_tiling and tiled.vae.tile_sample_min_size == 32
    assert tiled.vae.tile_latent_min_size == 32 // tiled.vae_scale_factor
    small = {"height": 32, "width": 32, "use_resolution_binning": False}
    np.testing.assert_array_equal(_images(tiled, **small), _images(plain, **small))  # not above: not tiled
    large = {"height": 64, "width": 96, "use_resolution_binning": False}
    tiled_large, plain_large = _images(tiled, **large), _images(plain, **large)
    assert tiled_large.shape == plain_large.shape and not np.array_equal(tiled_large, plain_large)


BAD = {
    "fp32": ({"dtype": torch.float32}, ValueError, "runs in half precision: dtype must be bfloat16 or float16"),
    "tile": ({"vae_tile_above": 4}, ValueError, "vae_tile_above must be None or an int >= 8"),
    "option": ({"offlaod": True}, ValueError, r"Unknown low-memory option\(s\) \['offlaod'\]"),
    "scheme": ({"text_encoder_scheme": "int8"}, ValueError, r"'int8' is a scheme of \['bitsandbytes'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_are_named_before_loading(tiny_pipeline_folder, monkeypatch, case):
    options, error, message = BAD[case]
    monkeypatch.setattr("dit.pipelines.sampling.strict_components", lambda *a: pytest.fail("loaded before the check"))
    with pytest.raises(error, match=message):
        TextToImagePipeline.from_pretrained(tiny_pipeline_folder, low_memory=options)
    with pytest.raises(TypeError, match="low_memory must be a bool, a LowMemoryConfig or a dict"):
        TextToImagePipeline.from_pretrained(tiny_pipeline_folder, low_memory="yes")
