"""DiffusionPipeline.from_pretrained on the folders this toolkit writes: our pipeline class, our images
(dit.pipelines.registration)."""

import subprocess
import sys
import types

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

from dit import ControlNetAdapter, PixArtTransformer
from dit.microshapes.shipped import default_lcm, default_model
from dit.pipelines import ClassToImagePipeline, ControlNetPipeline, TextToImagePipeline, load_lcm
from dit.pipelines.assemble import assemble
from dit.pipelines.registration import PIPELINES, register_pipelines
from tests.tiny import SIGMA, randomize_, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"


def _run(pipe, steps: int = 2, guidance_scale: float = 4.5, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    kwargs = {"height": 16, "width": 16, "use_resolution_binning": False, **kwargs}
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                output_type="np", **kwargs).images  # fmt: skip


def _loaded_both_ways(folder) -> tuple:
    ours, theirs = TextToImagePipeline.from_pretrained(folder), DiffusionPipeline.from_pretrained(folder)
    assert type(theirs) is type(ours)
    return ours, theirs


def test_folder_written_by_our_pipeline(tmp_path):
    """A folder as the trainer writes it (assemble: the pipeline and its sampling defaults)."""
    transformer = randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    assemble(tmp_path, tiny_tokenizer(), tiny_t5(), tiny_vae(), transformer, DPMSolverMultistepScheduler(), (2, 3.0))
    ours, theirs = _loaded_both_ways(tmp_path)
    assert type(theirs) is TextToImagePipeline and type(theirs.transformer) is PixArtTransformer
    assert np.array_equal(_run(theirs), _run(ours))


def test_shipped_model_and_its_lcm():
    """The shipped MicroShapes model, and the LCM student loaded onto it from the folder beside it."""
    ours, theirs = _loaded_both_ways(default_model())
    size = {"height": 64, "width": 64}
    assert np.array_equal(_run(theirs, guidance_scale=2.5, **size), _run(ours, guidance_scale=2.5, **size))
    ours, theirs = load_lcm(ours, default_lcm()), load_lcm(theirs, default_lcm())
    assert np.array_equal(_run(theirs, guidance_scale=1.0, **size), _run(ours, guidance_scale=1.0, **size))


def test_controlnet_pipeline_folder(tmp_path):
    transformer = randomize_(PixArtTransformer(**{**SIGMA, "num_layers": 3}), std=0.05).eval()
    adapter = randomize_(ControlNetAdapter.from_transformer(transformer, num_blocks=2), std=0.05).eval()
    pipe = ControlNetPipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                              transformer=transformer, scheduler=DPMSolverMultistepScheduler(), controlnet=adapter)  # fmt: skip
    pipe.save_pretrained(tmp_path)
    control = np.zeros((16, 16), dtype=np.uint8)
    control[4:12, 2:10] = 255
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is ControlNetPipeline and type(loaded.controlnet) is ControlNetAdapter
    assert np.array_equal(_run(loaded, control_image=control), _run(pipe, control_image=control))


def test_registration_resolves_our_classes_and_leaves_diffusers_own_alone():
    assert diffusers.TextToImagePipeline is TextToImagePipeline
    assert diffusers.ControlNetPipeline is ControlNetPipeline
    assert diffusers.ClassToImagePipeline is ClassToImagePipeline
    assert register_pipelines() == sorted(PIPELINES)  # idempotent
    sigma = diffusers.PixArtSigmaPipeline
    assert register_pipelines(pipelines={"PixArtSigmaPipeline": "dit.pipelines.text_to_image"}) == []
    assert diffusers.PixArtSigmaPipeline is sigma


def test_registration_on_a_plain_module_sets_the_classes():
    module = types.ModuleType("plain")
    assert register_pipelines(module) == sorted(PIPELINES)
    assert module.TextToImagePipeline is TextToImagePipeline
    assert register_pipelines(module) == sorted(PIPELINES)


def test_import_dit_registers_without_importing_the_pipelines():
    code = (
        "import sys, dit, diffusers\n"
        "assert 'dit.pipelines.text_to_image' not in sys.modules\n"
        "from dit.pipelines import TextToImagePipeline\n"
        "assert diffusers.TextToImagePipeline is TextToImagePipeline\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
