"""PixArtTransformer beyond parity: bad input, strict loading, position cache, checkpointing, LoRA, backends."""

import argparse
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit import PixArtTransformer
from dit.checkpoint import CheckpointKeyError, load_state_dict_file
from tests.tiny import CONFIGS, SIGMA, added_cond, randomize_


def _model(variant="sigma", **overrides):
    return randomize_(PixArtTransformer(**{**CONFIGS[variant], **overrides})).eval()


def _inputs(batch=2, height=8, width=8, text_len=6):
    return torch.randn(batch, 4, height, width), torch.randn(batch, text_len, 32), torch.tensor([5, 700][:batch])


# ----- bad input -------------------------------------------------------------------------------------------
def test_wrong_channel_count_names_both():
    latents, text, t = _inputs()
    with pytest.raises(ValueError, match="3 channels; this model takes 4"):
        _model()(latents[:, :3], text, t)


def test_latent_not_divisible_by_patch_names_size():
    _, text, t = _inputs()
    with pytest.raises(ValueError, match=r"7x8 is not divisible by the patch size 2"):
        _model()(torch.randn(2, 4, 7, 8), text, t)


def test_text_width_mismatch_names_widths():
    latents, _, t = _inputs()
    with pytest.raises(ValueError, match="width 16; .* is 32"):
        _model()(latents, torch.randn(2, 6, 16), t)


def test_text_batch_mismatch():
    latents, _, t = _inputs()
    with pytest.raises(ValueError, match="batch=2"):
        _model()(latents, torch.randn(3, 6, 32), t)


@pytest.mark.parametrize("height, width", [(8, 8), (8, 12)], ids=["square", "non-square"])
def test_micro_conditions_default_to_the_image_size(height, width):
    """Without added_cond_kwargs a micro-conditioned model uses the image's: latent size x vae_scale_factor."""
    latents, text, t = _inputs(height=height, width=width)
    model = _model("alpha")
    with torch.no_grad():
        implicit = model(latents, text, t).sample
        explicit = model(latents, text, t, added_cond_kwargs=added_cond(2, height * 8, width * 8)).sample
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    _model().save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["transformer_blocks.1.attn2.to_k.weight"]
    state["transformer_blocks.0.extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(CheckpointKeyError) as err:
        PixArtTransformer.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing key(s): transformer_blocks.1.attn2.to_k.weight" in message
    assert "unexpected key(s): transformer_blocks.0.extra.weight" in message


def test_pickle_only_folder_loads_weights_only_as_diffusers(tmp_path):
    """A folder with .bin weights only loads as diffusers loads it: torch.load(weights_only=True), no opt-in."""
    model = _model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    loaded = PixArtTransformer.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.warns(FutureWarning, match="allow_pickle=True.*no longer needed"):
        PixArtTransformer.from_pretrained(tmp_path, allow_pickle=True)


def test_pickle_file_of_weights_loads_and_one_that_needs_code_needs_the_opt_in(tmp_path):
    weights, training = tmp_path / "model.pth", tmp_path / "training.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, weights)
    assert torch.equal(load_state_dict_file(weights)["w"], torch.ones(2))  # weights only: no opt-in
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, training)
    with pytest.raises(ValueError, match="argparse.Namespace.*allow_pickle=True"):
        load_state_dict_file(training)  # a pickled class: weights_only cannot read it
    assert torch.equal(load_state_dict_file(training, allow_pickle=True)["w"], torch.ones(2))


def test_pickle_written_only_on_explicit_opt_in_with_a_warning(tmp_path):
    _model().save_pretrained(tmp_path / "default")
    assert [p.suffix for p in (tmp_path / "default").glob("diffusion_pytorch_model*")] == [".safetensors"]
    with pytest.warns(UserWarning, match="pickle"):
        _model().save_pretrained(tmp_path / "pickle", safe_serialization=False)


@pytest.mark.parametrize("bad", [dict(norm_type="layer_norm"), dict(attention_type="gated")])
def test_unsupported_config_is_named(bad):
    with pytest.raises(NotImplementedError, match=next(iter(bad.values()))):
        PixArtTransformer(**{**SIGMA, **bad})


def test_cross_attention_width_must_match_projection():
    with pytest.raises(ValueError, match="cross_attention_dim=40 must equal .* 24"):
        PixArtTransformer(**{**SIGMA, "cross_attention_dim": 40})


# ----- position embedding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(4, 4), (3, 7), (9, 2)])
def test_position_table_cached_per_grid(grid):
    model = _model()
    first = model.pos_embed.position_table(*grid, torch.device("cpu"))
    assert first.shape == (1, grid[0] * grid[1], model.inner_dim)
    assert model.pos_embed.position_table(*grid, torch.device("cpu")) is first
    assert not any("pos_embed" in k and "proj" not in k for k in model.state_dict())


def test_any_latent_size_runs():
    model = _model()
    for height, width in [(2, 2), (6, 18), (20, 4)]:
        latents, text, t = _inputs(height=height, width=width)
        with torch.no_grad():
            assert model(latents, text, t).sample.shape == (2, 8, height, width)


# ----- training features -----------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_gradient_checkpointing_same_gradients(masked):
    model = _model("alpha").train()
    latents, text, t = _inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]) if masked else None

    def grads():
        model.zero_grad()
        out = model(latents, text, t, added_cond(2), encoder_attention_mask=mask).sample
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_adapter_trains_only_lora_and_starts_as_identity():
    peft = pytest.importorskip("peft")
    model = _model()
    latents, text, t = _inputs()
    with torch.no_grad():
        before = model(latents, text, t).sample
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(latents, text, t).sample, before)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        assert not torch.allclose(model(latents, text, t).sample, before)


# ----- attention backends ----------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_math_backend_matches_sdpa(masked):
    model = _model()
    latents, text, t = _inputs()
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]) if masked else None
    with torch.no_grad():
        sdpa = model(latents, text, t, encoder_attention_mask=mask).sample
        model.set_attention_backend("math")
        math = model(latents, text, t, encoder_attention_mask=mask).sample
    assert (sdpa - math).abs().max().item() <= 1e-5


def test_xformers_on_cpu_falls_back_with_one_warning(monkeypatch):
    from dit.nn.attention import backends

    monkeypatch.setattr(backends, "_warned", set())
    model = _model()
    model.enable_xformers_memory_efficient_attention()
    latents, text, t = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(latents, text, t).sample
            model(latents, text, t)
    messages = [str(w.message) for w in caught if "xformers" in str(w.message)]
    assert len(messages) == 1  # once, not per forward
    assert model.transformer_blocks[0].attn1.backend.name == "sdpa"
    model.set_attention_backend("sdpa")
    with torch.no_grad():
        assert torch.equal(model(latents, text, t).sample, out)


def test_unknown_backend_lists_known():
    with pytest.raises(ValueError, match="math"):
        _model().set_attention_backend("flashy")
