"""The shipped MicroShapes model and its LCM student generate the images they generated before the package was
restructured (issue 23): the same pixels, recorded by commit 25962a5 in ``tests/fixtures/shipped_images.safetensors``.

The tolerance, 1e-6 on images in [0, 1], is far below one 8-bit level; on the machine that recorded the images the
difference is exactly 0. A CPU that rounds differently (another SIMD width) may need it; a changed computation does not
pass it.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dit.microshapes.shipped import default_lcm, default_model
from dit.pipelines import TextToImagePipeline, load_lcm

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shipped_images.safetensors"
CASES = {  # name -> (prompt, steps, guidance), as recorded
    "shipped": ("a large red circle on the left, on a white background", 8, 2.5),
    "lcm": ("two small blue squares, on a black background", 4, 1.0),
}
pytestmark = pytest.mark.skipif(not (default_model() / "model_index.json").is_file(), reason="no shipped model")


@pytest.mark.parametrize("name", CASES)
def test_images_equal_those_before_the_restructuring(name):
    pipe = TextToImagePipeline.from_pretrained(default_model())
    pipe.set_progress_bar_config(disable=True)
    if name == "lcm":
        load_lcm(pipe, default_lcm())
    prompt, steps, guidance = CASES[name]
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, clean_caption=False,
                 generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    expected = load_file(FIXTURE)[name].numpy()
    assert image.shape == expected.shape
    assert np.abs(np.asarray(image) - expected).max() <= 1e-6
