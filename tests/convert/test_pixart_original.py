"""Original PixArt checkpoints: built here from a diffusers model by the documented key table, then converted."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from dit.checkpoint import CheckpointKeyError
from dit.convert import (
    convert_pixart_original_state_dict,
    infer_pixart_config,
    load_original_pixart,
    position_scale_of,
)
from dit.nn.embeddings import sincos_2d
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


def test_pickle_original_of_weights_loads_and_one_that_needs_code_needs_the_opt_in(tmp_path):
    """A released .pth ({"state_dict": ...}) reads weights-only, no opt-in; a training checkpoint that pickles a
    class (here its argparse Namespace) is refused without allow_pickle=True, and read in full with it."""
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    state = original_state_dict(reference)
    released, training = tmp_path / "PixArt.pth", tmp_path / "epoch_1.pth"
    torch.save({"state_dict": state}, released)
    assert load_original_pixart(released, sample_size=8, attention_head_dim=12).config.num_layers == 2
    torch.save({"state_dict": state, "state_dict_ema": state, "args": argparse.Namespace(lr=1e-4)}, training)
    with pytest.raises(ValueError, match="argparse.Namespace.*allow_pickle=True"):
        load_original_pixart(training, sample_size=8, attention_head_dim=12)
    model = load_original_pixart(training, sample_size=8, attention_head_dim=12, allow_pickle=True, use_ema=True)
    assert model.config.num_layers == 2


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


def test_position_scale_comes_from_the_dropped_pos_embed():
    """PixArt-α 256 trained with lewei_scale 1, not sample_size / 64 = 0.5: the fixed table tells."""
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    original = original_state_dict(reference)
    for scale in (0.5, 1.0, 2.0):
        original["pos_embed"] = sincos_2d(24, 4, 4, 4, scale)[None]  # (1, 16, D)
        assert position_scale_of(original["pos_embed"]) == scale
        model = load_original_pixart(original, sample_size=32, attention_head_dim=12, kv_compress=False)
        assert model.config.interpolation_scale == scale
    assert position_scale_of(torch.zeros(1, 16, 24)) is None  # not a sin-cos table: PixArt's default for the size
    assert (
        load_original_pixart(original, 32, 12, interpolation_scale=0.7, kv_compress=False).config.interpolation_scale
        == 0.7
    )


def test_parameter_free_kv_compression_is_warned_about_and_can_be_given():
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    original = original_state_dict(reference)
    with pytest.warns(UserWarning, match="kv_compress="):
        assert load_original_pixart(original, 8, 12).config.kv_compress_ratio is None
    config = {"sampling": "ave", "scale_factor": 2, "kv_compress_layer": [1]}
    model = load_original_pixart(original, 8, 12, kv_compress=config)
    cfg = model.config
    assert (cfg.kv_compress_mode, cfg.kv_compress_ratio, cfg.kv_compress_layers) == ("ave", 2, [1])
    assert cfg.kv_compress_padding == "none"
    assert model.transformer_blocks[0].attn1.kv_compress is None
    assert model.transformer_blocks[1].attn1.kv_compress.mode == "ave"


def test_conv_kv_compression_converts_with_the_originals_padding():
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    original = original_state_dict(reference)
    original["blocks.1.attn.sr.weight"], original["blocks.1.attn.sr.bias"] = torch.randn(24, 1, 2, 2), torch.zeros(24)
    original["blocks.1.attn.norm.weight"], original["blocks.1.attn.norm.bias"] = torch.ones(24), torch.zeros(24)
    model = load_original_pixart(original, 8, 12)
    assert model.config.kv_compress_padding == "none" and model.config.kv_compress_layers == [1]
    with torch.no_grad():
        out = model(torch.randn(1, 4, 6, 10), torch.randn(1, 7, 32), torch.tensor([3])).sample  # 3x5 grid: 1x2 cells
    assert out.shape == (1, 8, 6, 10) and torch.isfinite(out).all()


def test_qk_norm_keys_are_converted():
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    original = original_state_dict(reference)
    for i in range(2):
        for name in ("q_norm", "k_norm"):
            original[f"blocks.{i}.attn.{name}.weight"] = torch.randn(24)
            original[f"blocks.{i}.attn.{name}.bias"] = torch.randn(24)
    model = load_original_pixart(original, 8, 12, kv_compress=False)
    assert model.config.qk_norm == "layer_norm_across_heads"
    assert torch.equal(model.transformer_blocks[1].attn1.norm_k.bias, original["blocks.1.attn.k_norm.bias"])
    assert model.transformer_blocks[0].attn2.norm_q is None  # the original's cross-attention has no qk norm


def test_ema_weights_of_a_training_checkpoint(tmp_path):
    reference, _ = diffusers_and_ours(CONFIGS["sigma"])
    raw, ema = original_state_dict(reference), original_state_dict(reference)
    ema["blocks.0.mlp.fc2.bias"] = ema["blocks.0.mlp.fc2.bias"] + 1
    checkpoint = {"state_dict": raw, "state_dict_ema": ema, "epoch": 3}
    torch.save(checkpoint, tmp_path / "epoch_3_step_9.pth")
    for source in (checkpoint, tmp_path / "epoch_3_step_9.pth"):
        for use_ema, expected in ((False, raw), (True, ema)):
            model = load_original_pixart(source, 8, 12, allow_pickle=True, kv_compress=False, use_ema=use_ema)
            bias = model.transformer_blocks[0].ff.net[2].bias
            assert torch.equal(bias, expected["blocks.0.mlp.fc2.bias"])
    with pytest.raises(KeyError, match="state_dict_ema"):
        load_original_pixart(raw, 8, 12, use_ema=True)


def test_converted_kv_checkpoint_gives_our_images_in_diffusers_sigma_pipeline(tmp_path):
    """An original PixArt-Σ checkpoint with conv KV compression, converted and saved, samples the same images in
    diffusers' PixArtSigmaPipeline (our transformer class) as in ours, on a 6x10 token grid with ratio 4, where the
    original's compression drops the remainder rows and columns."""
    from diffusers import PixArtSigmaPipeline

    from dit import PixArtTransformer
    from dit.pipelines import TextToImagePipeline
    from dit.tiny import TINY_PIXART, tiny_pipeline
    from tests.tiny import randomize_

    torch.manual_seed(0)
    model = randomize_(PixArtTransformer(**TINY_PIXART, kv_compress_ratio=4, kv_compress_layers=[1]), std=0.1)
    original, sd = original_state_dict(model), model.state_dict()
    for kind in ("weight", "bias"):
        original[f"blocks.1.attn.sr.{kind}"] = sd[f"transformer_blocks.1.attn1.kv_compress.conv.{kind}"]
        original[f"blocks.1.attn.norm.{kind}"] = sd[f"transformer_blocks.1.attn1.kv_compress.norm.{kind}"]
    save_file(original, tmp_path / "sigma-kv.safetensors")
    converted = load_original_pixart(tmp_path / "sigma-kv.safetensors", sample_size=8, attention_head_dim=12,
                                     interpolation_scale=1)  # fmt: skip
    assert converted.config.kv_compress_ratio == 4 and converted.config.kv_compress_padding == "none"
    parts = tiny_pipeline()
    TextToImagePipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                        transformer=converted, scheduler=parts.scheduler).save_pretrained(tmp_path / "pipe")  # fmt: skip
    theirs = PixArtSigmaPipeline.from_pretrained(tmp_path / "pipe")
    ours = TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    assert type(theirs.transformer) is PixArtTransformer
    kwargs = dict(num_inference_steps=2, guidance_scale=4.5, height=24, width=40, output_type="np",
                  use_resolution_binning=False)  # fmt: skip
    a = theirs("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    # Σ's inference (and diffusers') guides against the encoded empty prompt, not the learned null caption
    b = ours("a red circle", generator=torch.Generator().manual_seed(0), use_null_caption=False, **kwargs).images
    assert a.shape == (1, 24, 40, 3) and abs(a - b).max() < 1e-5
