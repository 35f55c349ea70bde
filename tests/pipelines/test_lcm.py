"""LCM folders: a full student or an LCM-LoRA with its consistency scheduler, loaded into a pipeline and the CLI."""

import json

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler
from peft import LoraConfig
from PIL import Image

from dit import PixArtTransformer
from dit.cli import main as cli_main
from dit.pipelines import TextToImagePipeline, load_lcm, save_lcm
from tests.tiny import SIGMA, randomize_, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"


def _pipe(transformer=None):
    torch.manual_seed(0)
    transformer = transformer or randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    pipe = TextToImagePipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                               transformer=transformer, scheduler=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, steps=2, guidance=1.0):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_lcm_folder_round_trip(tmp_path, kind):
    base = _pipe()
    if kind == "full":
        student = randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    else:
        student = PixArtTransformer.from_pretrained(_saved(base.transformer, tmp_path / "base"))
        student.add_adapter(
            LoraConfig(r=2, lora_alpha=8, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False)
        )
    scheduler = LCMScheduler(original_inference_steps=50, timestep_scaling=10.0)
    folder = save_lcm(tmp_path / "lcm", student.eval(), scheduler, num_inference_steps=2)
    assert json.loads((folder / "lcm_config.json").read_text()) == {"num_inference_steps": 2, "guidance_scale": 1.0}
    assert ((folder / "transformer").is_dir()) == (kind == "full")

    reference = _pipe(student)  # the student itself, sampled with the same scheduler
    reference.scheduler = LCMScheduler.from_config(scheduler.config)
    expected = _image(reference)
    loaded = load_lcm(_pipe(), folder)
    assert isinstance(loaded.scheduler, LCMScheduler)
    np.testing.assert_allclose(_image(loaded), expected, atol=1e-5)
    assert not np.allclose(_image(base), expected, atol=1e-3)


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder


def test_not_an_lcm_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="lcm_config.json"):
        load_lcm(_pipe(), tmp_path)
    (tmp_path / "lcm_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_lcm(_pipe(), tmp_path)


def test_cli_generate_with_an_lcm_folder(tmp_path, capsys):
    base = _pipe()
    base.save_pretrained(tmp_path / "base")
    student = randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    save_lcm(tmp_path / "lcm", student, LCMScheduler(), num_inference_steps=2)
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "--model", str(tmp_path / "base"), "--lcm-folder", str(tmp_path / "lcm")]
    assert cli_main([*argv, "-o", str(out)]) == 0
    assert Image.open(out).size == (16, 16)
    assert cli_main(["generate", PROMPT, "--model", str(tmp_path / "base"), "--lcm-folder", str(tmp_path)]) == 2
    assert "not an LCM folder" in capsys.readouterr().err
