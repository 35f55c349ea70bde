"""The low-memory preset and quantization on CUDA: model offload keeps the images of the preset without it,
bitsandbytes 8-bit/nf4 text encoders (PixArt-delta's) load and sample, float8 dynamic runs on Ada/Hopper."""

import numpy as np
import pytest
import torch

from dit.microshapes.shipped import default_model
from dit.pipelines import TextToImagePipeline
from dit.quantization import is_quantized, quantization_config


def _images(pipe):
    out = pipe(["a red circle", "a blue square"], num_inference_steps=10, output_type="np", clean_caption=False,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    return out.images


def test_offload_gives_the_preset_images_on_the_gpu():
    pytest.importorskip("torchao")
    offloaded = TextToImagePipeline.from_pretrained(default_model(), low_memory=True)
    assert getattr(offloaded, "_offload_device", None) is not None  # diffusers' model offload is on
    on_gpu = TextToImagePipeline.from_pretrained(default_model(), low_memory={"offload": False}).to("cuda")
    np.testing.assert_allclose(_images(offloaded), _images(on_gpu), atol=1e-3)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_bitsandbytes_text_encoder(scheme):
    pytest.importorskip("bitsandbytes", reason="pip install 'dit-toolkit[bitsandbytes]'")
    config = quantization_config(scheme, ["text_encoder"], backend="bitsandbytes")
    pipe = TextToImagePipeline.from_pretrained(default_model(), quantization_config=config, dtype=torch.bfloat16)
    assert is_quantized(pipe.text_encoder)
    pipe.to("cuda")  # diffusers leaves the bitsandbytes model where it loaded (on the GPU)
    assert np.isfinite(_images(pipe)).all()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="Ada/Hopper")
def test_float8_dynamic_transformer():
    pytest.importorskip("torchao")
    config = quantization_config("float8_dynamic", ["transformer"])
    pipe = TextToImagePipeline.from_pretrained(default_model(), quantization_config=config, dtype=torch.bfloat16)
    assert np.isfinite(_images(pipe.to("cuda"))).all()
