"""A transformer's config records what it predicts (``prediction_type``, ``noise_shift``), and ``scheduler=None``
samples with that: in ``TextToImagePipeline``, ``ControlNetPipeline`` and a folder without ``scheduler/``."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel

from dit import ControlNetAdapter, FiTTransformer, PixArtTransformer
from dit.microshapes.shipped import default_model
from dit.pipelines import ControlNetPipeline, TextToImagePipeline
from dit.pipelines.schedulers import default_scheduler, shifted_betas
from tests.tiny import SIGMA, randomize_, tiny_backbone, tiny_t5, tiny_tokenizer, tiny_vae

SHIPPED = default_model()
PROMPT = "a large red circle on the left, on a white background"
BACKBONES = dict(
    [
        tiny_backbone("tiny-pixart"),
        tiny_backbone("tiny-lit"),
        tiny_backbone("tiny-microdit", out_channels=4, num_experts=None),
        tiny_backbone("tiny-fit"),
    ]
)
PREDICTIONS = ["epsilon", "v_prediction", "sample", "flow"]


def _encoders() -> dict:
    return dict(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae())


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("cls", list(BACKBONES), ids=lambda cls: cls.__name__)
def test_the_config_round_trips_the_prediction_type(cls, prediction, tmp_path):
    model = cls(**BACKBONES[cls], prediction_type=prediction, noise_shift=2.0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["prediction_type"] == prediction
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.prediction_type == prediction and loaded.config.noise_shift == 2.0


@pytest.mark.parametrize("cls", list(BACKBONES), ids=lambda cls: cls.__name__)
def test_an_unrecorded_prediction_is_the_class_default(cls, tmp_path):
    """Folders saved before the field existed load as before: PixArt-style models unknown (ε), FiT flow."""
    cls(**BACKBONES[cls]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "prediction_type"}))
    expected = "flow" if cls is FiTTransformer else None
    assert cls.from_pretrained(tmp_path).prediction_type == expected == cls.prediction_type


@pytest.mark.parametrize("field, value", [("prediction_type", "x0"), ("noise_shift", 0.0), ("noise_shift", "2")])
def test_a_bad_record_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PixArtTransformer(**SIGMA, **{field: value})


def test_diffusers_loads_a_folder_with_the_record(tmp_path):
    ours = randomize_(PixArtTransformer(**SIGMA, prediction_type="sample", noise_shift=2.0))
    ours.save_pretrained(tmp_path)
    theirs = PixArtTransformer2DModel.from_pretrained(tmp_path)  # unknown keys are ignored with a log line
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    kwargs = dict(encoder_hidden_states=text, timestep=torch.tensor([10]), added_cond_kwargs={})
    with torch.no_grad():
        np.testing.assert_allclose(ours(x, **kwargs).sample, theirs(x, **kwargs).sample, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", None])
@pytest.mark.parametrize("shift", [None, 2.0])
def test_the_default_scheduler_follows_a_discrete_record(prediction, shift):
    scheduler = default_scheduler(PixArtTransformer(**SIGMA, prediction_type=prediction, noise_shift=shift))
    assert isinstance(scheduler, DPMSolverMultistepScheduler)
    assert scheduler.config.prediction_type == (prediction or "epsilon")
    if prediction is None:  # unknown: PixArt's own default, as before
        assert scheduler.config.trained_betas is None
    elif shift is not None:
        assert scheduler.config.trained_betas == shifted_betas(0.0001, 0.02, 1000, shift).tolist()
    else:
        assert scheduler.config.trained_betas is None and scheduler.config.beta_schedule == "linear"


@pytest.mark.parametrize("cls", [PixArtTransformer, FiTTransformer], ids=lambda cls: cls.__name__)
def test_a_flow_record_gets_flow_matching_with_dynamic_shift(cls):
    model = cls(**BACKBONES[cls], prediction_type="flow")
    pipe = TextToImagePipeline(transformer=model, scheduler=None, **_encoders())
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.use_dynamic_shifting
    assert pipe.scheduler.config.base_image_seq_len == 16  # 4x4 patches at the training size


def test_controlnet_pipeline_follows_the_record():
    transformer = randomize_(PixArtTransformer(**SIGMA, prediction_type="v_prediction"), std=0.05)
    adapter = ControlNetAdapter.from_transformer(transformer, num_blocks=1)
    pipe = ControlNetPipeline(transformer=transformer, scheduler=None, controlnet=adapter, **_encoders())
    assert pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("missing", ["folder", "entry"])
def test_a_folder_without_its_scheduler_samples_with_the_record(missing, tmp_path):
    transformer = randomize_(PixArtTransformer(**SIGMA, prediction_type="sample"), std=0.05)
    TextToImagePipeline(transformer=transformer, scheduler=None, **_encoders()).save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "scheduler")
    if missing == "entry":
        index = json.loads((tmp_path / "model_index.json").read_text())
        (tmp_path / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "scheduler"}))
    pipe = TextToImagePipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.config.prediction_type == "sample"
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np").images.shape == (
        1,
        16,
        16,
        3,
    )


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="no shipped model")
def test_the_shipped_model_samples_alike_without_its_scheduler():
    """The shipped x0 model (noise_shift 2) given ``scheduler=None`` makes the image its own saved scheduler makes;
    PixArt's ε default (what ``scheduler=None`` gave before the record) makes another."""
    pipe = TextToImagePipeline.from_pretrained(SHIPPED)
    parts = {name: part for name, part in pipe.components.items() if name != "scheduler"}
    images = []
    for scheduler in (pipe.scheduler, None, DPMSolverMultistepScheduler()):
        p = TextToImagePipeline(**parts, scheduler=scheduler)
        p.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        images.append(p(PROMPT, num_inference_steps=4, guidance_scale=2.5, height=64, width=64, output_type="np",
                        generator=generator).images)  # fmt: skip
    saved, default, epsilon = images
    assert np.array_equal(saved, default)
    assert np.abs(saved - epsilon).mean() > 0.05
