"""Size presets (dit.models.presets): every one builds, the published ones have their documented parameter counts,
the PixArt ones are diffusers' models, and the MicroShapes ones are the shipped models' and configs' sizes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import PixArtTransformer2DModel

from dit.models.presets import PRESETS, Preset, build_preset, preset, preset_config
from dit.models.registry import backbone_class

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = [name for name, p in PRESETS.items() if p.params is not None]
#: MicroShapes preset -> the training config that trained (or trains) it
MICROSHAPES_CONFIGS = {
    "microshapes": "microshapes.yaml",
    "microshapes-microdit": "microshapes_microdit.yaml",
    "microshapes-fit": "microshapes_fit.yaml",
    "microshapes-microdit-original": "microshapes_microdit_original.yaml",
}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_as_its_class_with_its_config(name):
    with torch.device("meta"):
        model = build_preset(name)
    assert type(model) is backbone_class(PRESETS[name].cls)
    for key, value in PRESETS[name].config.items():
        recorded = model.config[key]
        assert (list(recorded) if isinstance(value, (list, tuple)) else recorded) == (
            list(value) if isinstance(value, (list, tuple)) else value
        ), key


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_sizes_have_their_documented_parameter_count(name):
    spec = PRESETS[name]
    with torch.device("meta"):
        count = _params(build_preset(name))
    assert abs(count / spec.params - 1) <= spec.params_tolerance, (count, spec.params)


def test_the_published_sizes_are_the_xl_ones():
    assert {"PixArt-XL-2-512", "PixArt-XL-2-1024", "LiT-XL-2-1024", "FiTv2-XL-2", "MicroDiT-XL-2"} <= set(PUBLISHED)
    with torch.device("meta"):
        pixart = build_preset("PixArt-XL-2-1024")
    assert len(pixart.transformer_blocks) == 28 and pixart.inner_dim == 1152
    assert pixart.config.use_additional_conditions and pixart.config.caption_channels == 4096


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.cls == "PixArtTransformer"])
def test_pixart_presets_are_diffusers_models(name):
    """The same config builds diffusers' PixArtTransformer2DModel with the same keys and shapes (what the benchmarks
    load into ours strictly)."""
    with torch.device("meta"):
        ours = build_preset(name).state_dict()
        reference = PixArtTransformer2DModel(**preset_config(name)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


@pytest.mark.parametrize("name", list(MICROSHAPES_CONFIGS))
def test_microshapes_presets_are_the_training_configs(name):
    model = yaml.safe_load((ROOT / "configs" / MICROSHAPES_CONFIGS[name]).read_text())["model"]
    assert model["cls"] == PRESETS[name].cls
    assert model["kwargs"] == preset_config(name)


def test_the_microshapes_preset_is_the_shipped_model():
    shipped = json.loads((ROOT / "dit" / "assets" / "microshapes" / "transformer" / "config.json").read_text())
    assert shipped["_class_name"] == PRESETS["microshapes"].cls
    assert {k: shipped[k] for k in PRESETS["microshapes"].config} == preset_config("microshapes")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'PixArt-XXL' is not a size preset; choose one of \[.*'tiny-pixart'"):
        preset_config("PixArt-XXL")
    with pytest.raises(ValueError, match="is not a size preset"):
        build_preset("pixart-xl-2-1024")  # names are case-sensitive


def test_overrides_apply_and_copies_are_fresh():
    model = build_preset("tiny-pixart", num_layers=3, kv_compress_ratio=2)
    assert len(model.transformer_blocks) == 3 and model.config.kv_compress_ratio == 2
    config = preset_config("microshapes-fit", sample_size=16)
    assert config["sample_size"] == 16 and PRESETS["microshapes-fit"].config["sample_size"] == 32
    config["train_grid"].append(1)
    assert preset_config("microshapes-fit")["train_grid"] == [8, 8]


def test_presets_are_read_only():
    spec = preset("tiny-fit")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.cls = "PixArtTransformer"
    with pytest.raises(TypeError):
        spec.config["num_layers"] = 4
    assert isinstance(spec, Preset) and spec.source
