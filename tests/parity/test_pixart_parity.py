"""Our PixArtTransformer against diffusers' PixArtTransformer2DModel: same weights, fp32, CPU, max |diff| <= 1e-5 of the
output's magnitude (:func:`tests.tiny.assert_fp32_close`)."""

import json

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from dit import PixArtTransformer
from tests.tiny import CONFIGS, added_cond, assert_fp32_close, diffusers_and_ours

SHAPES = {"square": (8, 8), "wide": (6, 14), "tall": (12, 4), "unseen-large": (16, 16)}


def _text_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate([3, length, 7, 1][:batch]):
        mask[i, :n] = 1
    return mask


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("variant", CONFIGS.keys())
def test_forward_matches_diffusers(variant, shape, masked):
    config = CONFIGS[variant]
    reference, ours = diffusers_and_ours(config)
    batch, length = 4, 12
    latents = torch.randn(batch, config["in_channels"], *shape)
    text = torch.randn(batch, length, config["caption_channels"])
    timestep = torch.tensor([0, 250, 999, 17])
    mask = _text_mask(batch, length) if masked else None
    added = added_cond(batch) if config["use_additional_conditions"] else None
    with torch.no_grad():
        expected = reference(latents, text, timestep, added_cond_kwargs=added, encoder_attention_mask=mask).sample
        actual = ours(latents, text, timestep, added_cond_kwargs=added, encoder_attention_mask=mask).sample
    assert actual.shape == (batch, config["out_channels"], *shape)
    assert_fp32_close(actual, expected)


@pytest.mark.parametrize("variant", CONFIGS.keys())
def test_trailing_padding_matches_diffusers(variant):
    """All prompts padded: the padding is trimmed from cross-attention, and the result still matches."""
    config = CONFIGS[variant]
    reference, ours = diffusers_and_ours(config)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 30, config["caption_channels"])
    mask = torch.zeros(2, 30, dtype=torch.long)
    mask[0, :5], mask[1, :9] = 1, 1
    added = added_cond(2) if config["use_additional_conditions"] else None
    with torch.no_grad():
        expected = reference(latents, text, torch.tensor([10, 900]), added, encoder_attention_mask=mask).sample
        actual = ours(latents, text, torch.tensor([10, 900]), added, encoder_attention_mask=mask).sample
    assert_fp32_close(actual, expected)


def test_bias_masks_and_image_mask_match_diffusers():
    """diffusers also takes 3-D biases and a self-attention keep-mask over image tokens."""
    config = CONFIGS["sigma"]
    reference, ours = diffusers_and_ours(config)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32)
    text_bias = torch.tensor([[0, 0, 0, -10000.0, -10000.0, -10000.0], [0] * 6])[:, None]  # (B, 1, L)
    image_mask = torch.ones(2, 16, dtype=torch.long)
    image_mask[0, 5:9] = 0
    with torch.no_grad():
        kwargs = dict(encoder_attention_mask=text_bias, attention_mask=image_mask)
        expected = reference(latents, text, torch.tensor([3, 500]), **kwargs).sample
        actual = ours(latents, text, torch.tensor([3, 500]), **kwargs).sample
    assert_fp32_close(actual, expected)


def test_fully_masked_prompt_matches_diffusers():
    """A prompt with no kept token attends uniformly under PixArt's finite bias; we must not trim that away."""
    config = CONFIGS["sigma"]
    reference, ours = diffusers_and_ours(config)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 10, 32)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[1, :4] = 1
    with torch.no_grad():
        expected = reference(latents, text, torch.tensor([3, 500]), encoder_attention_mask=mask).sample
        actual = ours(latents, text, torch.tensor([3, 500]), encoder_attention_mask=mask).sample
    assert_fp32_close(actual, expected)


@pytest.mark.parametrize("class_name", ["PixArtTransformer2DModel", "Transformer2DModel"])
def test_diffusers_folder_loads_strictly(tmp_path, class_name):
    config = CONFIGS["alpha"]
    reference, _ = diffusers_and_ours(config)
    reference.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    saved["_class_name"] = class_name
    if class_name == "Transformer2DModel":  # legacy hub configs carry Transformer2DModel's extra fields
        saved.update(norm_type="ada_norm_single", use_linear_projection=False, only_cross_attention=False)
    config_file.write_text(json.dumps(saved))
    ours = PixArtTransformer.from_pretrained(tmp_path)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = reference(latents, text, torch.tensor([1, 2]), added_cond(2)).sample
        actual = ours(latents, text, torch.tensor([1, 2]), added_cond(2)).sample
    assert_fp32_close(actual, expected)


def test_our_folder_loads_in_diffusers(tmp_path):
    config = CONFIGS["sigma"]
    reference, ours = diffusers_and_ours(config)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    for key, value in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
