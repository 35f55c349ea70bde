"""Backbone configs: the main int fields are type- and range-checked with a clear message, kv_compress_ratio=0 is an
error (not "no compression"), and a config.json field the backbone does not know is an error naming it."""

import json

import pytest

from dit import ControlNetAdapter, FiTTransformer, LiTTransformer, MicroDiTTransformer, PixArtTransformer
from tests.tiny import FIT, SIGMA

BAD_PIXART = {
    "heads-word": (dict(num_attention_heads="four"), r"num_attention_heads must be a positive int, got 'four'"),
    "head-dim-zero": (dict(attention_head_dim=0), r"attention_head_dim must be a positive int, got 0"),
    "layers-negative": (dict(num_layers=-1), r"num_layers must be a positive int, got -1"),
    "layers-float": (dict(num_layers=2.0), r"num_layers must be a positive int, got 2.0"),
    "layers-bool": (dict(num_layers=True), r"num_layers must be a positive int, got True"),
    "patch-zero": (dict(patch_size=0), r"patch_size must be a positive int, got 0"),
    "sample-size-zero": (dict(sample_size=0), r"sample_size must be a positive int, got 0"),
    "in-channels-word": (dict(in_channels="4"), r"in_channels must be a positive int, got '4'"),
    "out-channels-zero": (dict(out_channels=0), r"out_channels must be a positive int or None, got 0"),
    "caption-zero": (dict(caption_channels=0), r"caption_channels must be a positive int or None, got 0"),
    "kv-zero": (dict(kv_compress_ratio=0), r"kv_compress_ratio must be None \(no compression\) or an int >= 2, got 0"),
    "kv-one": (dict(kv_compress_ratio=1), r"kv_compress_ratio must be None \(no compression\) or an int >= 2, got 1"),
    "kv-float": (dict(kv_compress_ratio=2.5), r"kv_compress_ratio .* got 2.5"),
    "kv-layers-range": (dict(kv_compress_ratio=2, kv_compress_layers=[5]), r"kv_compress_layers .* 0 to 1, got \[5\]"),
    "linear-heads-zero": (dict(linear_attention_heads=0), r"linear_attention_heads must be a positive int or None"),
    "time-cond-word": (dict(time_cond_proj_dim="x"), r"time_cond_proj_dim must be a positive int or None, got 'x'"),
}


@pytest.mark.parametrize("cls", [PixArtTransformer, LiTTransformer, MicroDiTTransformer])
@pytest.mark.parametrize("overrides, message", BAD_PIXART.values(), ids=BAD_PIXART.keys())
def test_pixart_family_int_fields_are_checked(cls, overrides, message):
    with pytest.raises(ValueError, match=message):
        cls(**{**SIGMA, **overrides})


BAD_FIT = {
    "heads-word": (dict(num_attention_heads="four"), r"num_attention_heads must be a positive int, got 'four'"),
    "head-dim-word": (dict(attention_head_dim="8"), r"attention_head_dim must be a positive int, got '8'"),
    "max-tokens-zero": (dict(max_tokens=0), r"max_tokens must be a positive int or None, got 0"),
    "grid-zero": (dict(train_grid=[0, 4]), r"train_grid must be None or two positive ints \(h, w\), got \[0, 4\]"),
    "classes-zero": (dict(num_classes=0), r"num_classes must be a positive int or None, got 0"),
}


@pytest.mark.parametrize("overrides, message", BAD_FIT.values(), ids=BAD_FIT.keys())
def test_fit_int_fields_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        FiTTransformer(**{**FIT, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(patch_mixer_layers="two"), r"patch_mixer_layers must be an int >= 0, got 'two'"),
        (dict(num_experts=0), r"num_experts must be a positive int or None, got 0"),
        (dict(experts_every_n=0), r"experts_every_n must be a positive int, got 0"),
    ],
)
def test_microdit_fields_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        MicroDiTTransformer(**{**SIGMA, **overrides})


def test_controlnet_positions_must_be_ints():
    base = PixArtTransformer(**{**SIGMA, "num_layers": 3})
    with pytest.raises(ValueError, match=r"ControlNet positions must be ints, got \['a'\]"):
        ControlNetAdapter.from_transformer(base, positions=["a"])


def _saved_config(tmp_path, model, **changes):
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return tmp_path


@pytest.mark.parametrize(
    "cls, config",
    [(PixArtTransformer, SIGMA), (MicroDiTTransformer, SIGMA), (FiTTransformer, FIT)],
    ids=["pixart", "microdit", "fit"],
)
def test_unknown_config_field_is_named(tmp_path, cls, config):
    folder = _saved_config(tmp_path, cls(**config), num_attention_head=2, qk_nrom=True)
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['num_attention_head', 'qk_nrom'\]"):
        cls.from_pretrained(folder)


def test_bad_value_in_config_json_is_named(tmp_path):
    folder = _saved_config(tmp_path, PixArtTransformer(**SIGMA), num_attention_heads="four")
    with pytest.raises(ValueError, match=r"num_attention_heads must be a positive int, got 'four'"):
        PixArtTransformer.from_pretrained(folder)


def test_private_and_legacy_keys_still_load(tmp_path):
    """diffusers' own bookkeeping keys, and Transformer2DModel's legacy fields under its class name, load as before."""
    legacy = dict(_class_name="Transformer2DModel", _name_or_path="x", use_linear_projection=False,
                  only_cross_attention=False, double_self_attention=False, num_vector_embeds=None)  # fmt: skip
    folder = _saved_config(tmp_path, PixArtTransformer(**SIGMA), **legacy)
    assert PixArtTransformer.from_pretrained(folder).config.num_attention_heads == SIGMA["num_attention_heads"]
