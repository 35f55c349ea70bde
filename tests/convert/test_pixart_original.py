"""Original PixArt checkpoints: built here from a diffusers model by the documented key table, then converted."""

import pytest
import torch
from safetensors.torch import save_file

from dit.checkpoint import CheckpointKeyError
from dit.convert import convert_pixart_original_state_dict, infer_pixart_config, load_original_pixart
from tests.tiny import CONFIGS, added_cond, diffusers_and_ours, original_state_dict


@pytest.mark.parametrize("variant", CONFIGS.keys())
def test_original_checkpoint_converts_exactly(tmp_path, variant):
    config = {**CONFIGS[variant], "cross_attention_dim": 24}
    reference, _ = diffusers_and_ours(config)
    original = original_state_dict(reference)
    path = tmp_path / "PixArt-tiny.safetensors"
    save_file(original, path)
    model = load_original_pixart(
        path,
        sample_size=config["sample_size"],
        attention_head_dim=12,
        interpolation_scale=config["interpolation_scale"],
    ).eval()
    cfg = model.config
    assert cfg.num_layers == 2 and cfg.num_attention_heads == 2 and cfg.out_channels == 8
    assert cfg.use_additional_conditions == config["use_additional_conditions"]
    assert torch.equal(model.y_embedding, original["y_embedder.y_embedding"])
    latents, text = torch.randn(2, 4, 6, 10), torch.randn(2, 7, 32)
    added = added_cond(2) if cfg.use_additional_conditions else None
    with torch.no_grad():
        expected = reference(latents, text, torch.tensor([4, 600]), added).sample
        actual = model(latents, text, torch.tensor([4, 600]), added).sample
    assert (actual - expected).abs().max().item() <= 1e-5


def test_null_caption_is_the_learned_embedding(tmp_path):
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    original = original_state_dict(reference, null_length=12)
    save_file(original, tmp_path / "m.safetensors")
    model = load_original_pixart(tmp_path / "m.safetensors", sample_size=8, attention_head_dim=12)
    null = model.null_caption(batch_size=3, length=10)
    assert null.shape == (3, 10, 32)
    assert torch.equal(null[2], original["y_embedder.y_embedding"][:10])
    with pytest.raises(ValueError, match="12 tokens; 20 were asked"):
        model.null_caption(1, 20)


def test_pickle_original_needs_opt_in(tmp_path):
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    path = tmp_path / "PixArt.pth"
    torch.save({"state_dict": original_state_dict(reference)}, path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_original_pixart(path, sample_size=8, attention_head_dim=12)
    assert load_original_pixart(path, sample_size=8, attention_head_dim=12, allow_pickle=True).config.num_layers == 2


def test_unknown_key_is_named():
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    original = original_state_dict(reference)
    original["blocks.0.attn.mystery.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="blocks.0.attn.mystery.weight"):
        convert_pixart_original_state_dict(original)


def test_incomplete_checkpoint_lists_missing(tmp_path):
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    original = original_state_dict(reference)
    del original["blocks.1.mlp.fc2.bias"]
    save_file(original, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointKeyError, match="transformer_blocks.1.ff.net.2.bias"):
        load_original_pixart(tmp_path / "m.safetensors", sample_size=8, attention_head_dim=12)


def test_config_inference_follows_pixart_scales():
    reference, _ = diffusers_and_ours(CONFIGS["alpha"])
    converted = convert_pixart_original_state_dict(original_state_dict(reference))
    assert infer_pixart_config(converted, sample_size=128, attention_head_dim=12)["interpolation_scale"] == 2
    assert infer_pixart_config(converted, sample_size=32, attention_head_dim=12)["interpolation_scale"] == 0.5
