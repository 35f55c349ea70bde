"""Sampling defaults recorded in a pipeline folder: read back, PixArt's when absent, bad files named."""

import json

import pytest

from dit.pipelines.defaults import PIXART_DEFAULTS, SAMPLING_DEFAULTS, sampling_defaults, save_sampling_defaults


def test_absent_file_gives_pixart_defaults(tmp_path):
    assert sampling_defaults(tmp_path) == PIXART_DEFAULTS == {"num_inference_steps": 20, "guidance_scale": 4.5}


@pytest.mark.parametrize("steps, guidance", [(20, 2.5), (4, 1.0)])
def test_round_trip(tmp_path, steps, guidance):
    path = save_sampling_defaults(tmp_path, steps, guidance)
    assert path.name == SAMPLING_DEFAULTS
    assert sampling_defaults(tmp_path) == {"num_inference_steps": steps, "guidance_scale": guidance}


def test_partial_file_keeps_the_other_default(tmp_path):
    (tmp_path / SAMPLING_DEFAULTS).write_text(json.dumps({"guidance_scale": 3.0}))
    assert sampling_defaults(tmp_path) == {"num_inference_steps": 20, "guidance_scale": 3.0}


def test_unknown_key_is_named(tmp_path):
    (tmp_path / SAMPLING_DEFAULTS).write_text(json.dumps({"guidance": 3.0}))
    with pytest.raises(ValueError, match="guidance"):
        sampling_defaults(tmp_path)


@pytest.mark.parametrize("steps, guidance, word", [(0, 2.5, "num_inference_steps"), (20, float("nan"), "guidance")])
def test_bad_values_are_refused(tmp_path, steps, guidance, word):
    with pytest.raises(ValueError, match=word):
        save_sampling_defaults(tmp_path, steps, guidance)
    assert not (tmp_path / SAMPLING_DEFAULTS).exists()


def test_guidance_channels_are_recorded_only_when_given(tmp_path):
    save_sampling_defaults(tmp_path, 20, 1.5, guidance_channels=3)
    assert json.loads((tmp_path / SAMPLING_DEFAULTS).read_text())["guidance_channels"] == 3
    assert sampling_defaults(tmp_path) == {"num_inference_steps": 20, "guidance_scale": 1.5, "guidance_channels": 3}
    save_sampling_defaults(tmp_path, 20, 1.5)
    assert "guidance_channels" not in json.loads((tmp_path / SAMPLING_DEFAULTS).read_text())


@pytest.mark.parametrize("channels", [0, -1, 2.5, True, "3"])
def test_bad_guidance_channels_are_refused(tmp_path, channels):
    (tmp_path / SAMPLING_DEFAULTS).write_text(json.dumps({"guidance_channels": channels}))
    with pytest.raises(ValueError, match=r"sampling_defaults.json: guidance_channels must be None .* int >= 1"):
        sampling_defaults(tmp_path)
