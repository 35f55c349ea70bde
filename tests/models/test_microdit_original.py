"""MicroDiT as published (:class:`dit.MicroDiTOriginalTransformer`) on tiny configs: the backbone contract, token
masking (kept indices in any order, the mask token, compute on kept tokens only), the text mask option, the zero null
caption, any latent size, save/load, and the config errors. Parity with the original code is in
tests/convert/test_microdit_fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers.hooks._helpers import TransformerBlockRegistry

from dit import MicroDiTOriginalTransformer
from dit.models.backbone import REQUIRED_CONFIG
from dit.models.capabilities import capability
from dit.models.presets import build_preset, preset_config
from dit.models.registry import backbone_class, load_backbone
from dit.nn.embeddings import sincos_2d
from dit.nn.masking import keep_indices_from_scores, kept_count
from dit.nn.microdit_block import MicroDiTBlock
from dit.nn.moe import ExpertChoiceFeedForward
from tests.tiny import randomize_

#: tiny-microdit-original's variants: biases, a mixer as wide as the backbone (no maps), no experts
VARIANTS = {
    "narrow-mixer": {},
    "bias": {"attention_bias": True},
    "wide-mixer": {"patch_mixer_dim": None},
    "dense": {"num_experts": None},
    "no-mixer": {"patch_mixer_layers": 0, "patch_mixer_dim": None},
}
SIZES = {"square": (8, 8), "wide": (6, 10)}


def _model(seed: int = 0, **overrides) -> MicroDiTOriginalTransformer:
    torch.manual_seed(seed)
    model = randomize_(build_preset("tiny-microdit-original", **overrides), std=0.1).eval()
    model.mask_token.normal_()  # zeros in released checkpoints; random here, so where it goes shows
    return model


def _inputs(size=(8, 8), batch: int = 2, seed: int = 0, length: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, *size, generator=gen),
        "encoder_hidden_states": torch.randn(batch, length, 32, generator=gen),
        "timestep": torch.tensor([0.9, -0.7])[:batch],  # c_noise = ln(sigma) / 4
    }


def _keep(n_tokens: int, ratio: float = 0.5, batch: int = 2, seed: int = 0) -> torch.Tensor:
    scores = torch.rand(batch, n_tokens, generator=torch.Generator().manual_seed(seed))
    return keep_indices_from_scores(scores, kept_count(n_tokens, ratio))  # ascending


def _forward(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


ROOT = Path(__file__).resolve().parents[2]


# ----- the contract ----------------------------------------------------------------------------------------------
def test_the_family_is_on_the_backbone_contract():
    assert backbone_class("MicroDiTOriginalTransformer") is MicroDiTOriginalTransformer
    assert MicroDiTOriginalTransformer._repeated_blocks == ["MicroDiTBlock"]
    assert MicroDiTOriginalTransformer._no_split_modules == ["MicroDiTBlock"]
    assert MicroDiTBlock in TransformerBlockRegistry._registry
    model = _model()
    assert all(field in model.config for field in REQUIRED_CONFIG)
    assert all(isinstance(b, MicroDiTBlock) for b in [*model.transformer_blocks, *model.patch_mixer])
    assert capability(model, "supports_token_masking") and capability(model, "has_null_caption")
    assert not capability(model, "supports_block_controls") and not capability(model, "needs_full_grid")


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS.keys())
def test_forward_any_size_masked_or_not(variant, size):
    model = _model(**VARIANTS[variant])
    inputs = _inputs(size)
    out = _forward(model, **inputs)
    assert out.shape == (2, 4, *size) and torch.isfinite(out).all()
    masked = _forward(model, **inputs, keep_indices=_keep(size[0] * size[1] // 4))
    assert masked.shape == out.shape and torch.isfinite(masked).all() and not torch.allclose(masked, out)


def test_widths_of_the_tiny_preset():
    """Layer-wise scaling (self-attention 16 / 32 / 32 wide), full-width cross-attention, MoE in block 1 of each."""
    model = _model()
    assert [b.attn1.heads for b in model.transformer_blocks] == [2, 4, 4]
    assert [b.attn2.heads for b in model.transformer_blocks] == [4, 4, 4]
    assert [isinstance(b.ff, ExpertChoiceFeedForward) for b in model.transformer_blocks] == [False, True, False]
    assert [isinstance(b.ff, ExpertChoiceFeedForward) for b in model.patch_mixer] == [False, True]
    assert model.patch_mixer[0].attn1.heads == 2 and model.patch_mixer_proj_text.linear.out_features == 16


def test_positions_interpolate_beyond_the_training_grid():
    """At the training grid the table is the original's buffer; elsewhere PixArt's interpolation, per axis."""
    model = _model()
    base = sincos_2d(32, 4, 4, base_size=4, interpolation_scale=1.0)
    torch.testing.assert_close(model.pos_embed.position_table(4, 4, torch.device("cpu"))[0], base)
    wide = model.pos_embed.position_table(3, 5, torch.device("cpu"))[0]
    torch.testing.assert_close(wide, sincos_2d(32, 3, 5, base_size=4, interpolation_scale=1.0))


# ----- token masking -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "naive"])
def test_masked_tokens_take_no_compute_after_the_mixer(size, deferred):
    model = _model(deferred_masking=deferred)
    n_tokens = size[0] * size[1] // 4
    keep = _keep(n_tokens, ratio=0.75)
    seen = {"mixer": [], "backbone": []}
    for name, blocks in (("mixer", model.patch_mixer), ("backbone", model.transformer_blocks)):
        for block in blocks:
            block.register_forward_hook(lambda m, args, out, name=name: seen[name].append(args[0].shape[1]))
    _forward(model, **_inputs(size), keep_indices=keep)
    assert seen["backbone"] == [keep.shape[1]] * 3
    assert seen["mixer"] == [n_tokens if deferred else keep.shape[1]] * 2


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS.keys())
def test_kept_indices_in_any_order_and_the_mask_token(variant):
    """A shuffled ``keep_indices`` (the original's order) gives the ascending one's output up to summation order;
    removed patches hold ``mask_token`` exactly."""
    model, inputs = _model(**VARIANTS[variant]), _inputs((6, 10))
    keep = _keep(15)
    shuffled = keep.gather(1, torch.stack([torch.randperm(keep.shape[1]) for _ in range(2)]))
    out = _forward(model, **inputs, keep_indices=keep)
    torch.testing.assert_close(_forward(model, **inputs, keep_indices=shuffled), out, rtol=1e-5, atol=1e-5)
    patches = out.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, h, w, p, p)
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(2, 15, -1)  # (B, N, p*p*C), the unpatchify order
    removed = torch.ones(2, 15, dtype=torch.bool).scatter(1, keep, False)
    assert torch.equal(patches[removed], model.mask_token[0].expand(int(removed.sum()), -1))
    assert not torch.equal(patches[~removed], model.mask_token[0].expand(int((~removed).sum()), -1))


def test_keep_indices_errors_name_the_shape():
    model = _model()
    with pytest.raises(ValueError, match=r"keep_indices must be \(batch=2, K\) with 0 < K <= 16 tokens"):
        _forward(model, **_inputs(), keep_indices=torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="keep_indices must be int64"):
        _forward(model, **_inputs(), keep_indices=torch.zeros(2, 4, dtype=torch.int32))


def test_routing_stats_after_a_forward():
    model = _model()
    assert model.routing_stats() == {}
    _forward(model, **_inputs(), keep_indices=_keep(16))
    assert model.routing_stats()["experts_per_token"] > 0
    assert _model(num_experts=None).routing_stats() == {}


# ----- text -------------------------------------------------------------------------------------------------------
def test_the_text_mask_is_read_only_with_use_text_mask(caplog):
    inputs = _inputs()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    original = _model()  # the original reads every token: a mask is ignored, with a warning
    plain = _forward(original, **inputs)
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(_forward(original, **inputs, encoder_attention_mask=mask), plain, rtol=0, atol=0)
    assert "the encoder_attention_mask given is ignored" in caplog.text and not original.uses_text_mask
    masked = _model(use_text_mask=True)
    assert masked.uses_text_mask
    ones = _forward(masked, **inputs, encoder_attention_mask=torch.ones(2, 5, dtype=torch.long))
    torch.testing.assert_close(ones, _forward(masked, **inputs), rtol=1e-6, atol=1e-6)
    out = _forward(masked, **inputs, encoder_attention_mask=mask)
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][0, 3:] = 100.0  # padded tokens: read by nothing
    torch.testing.assert_close(_forward(masked, **changed, encoder_attention_mask=mask), out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], ones[0], atol=1e-4)  # sample 0's padding is dropped...
    torch.testing.assert_close(out[1], ones[1], rtol=1e-5, atol=1e-5)  # ...sample 1 has none


def test_the_null_caption_is_zeros_and_any_mask_leaves_it_unchanged():
    model = _model(use_text_mask=True)
    null = model.null_caption(2, 5)
    assert null.shape == (2, 5, 32) and not null.any()
    inputs = dict(_inputs(), encoder_hidden_states=null)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(_forward(model, **inputs, encoder_attention_mask=mask), _forward(model, **inputs))


def test_micro_conditions_are_refused_and_none_are_accepted():
    model = _model()
    out = _forward(model, **_inputs(), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    torch.testing.assert_close(out, _forward(model, **_inputs()), rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"MicroDiT takes no micro-conditions; added_cond_kwargs gave \['resolution'\]"
    ):
        _forward(model, **_inputs(), added_cond_kwargs={"resolution": torch.ones(2, 2)})


# ----- save / load, init, training --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS.keys())
def test_save_and_load_round_trip(variant, tmp_path):
    model = _model(**VARIANTS[variant])
    model.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded) is MicroDiTOriginalTransformer and public(loaded.config) == public(model.config)
    assert torch.equal(loaded.mask_token, model.mask_token)
    inputs = dict(_inputs(), keep_indices=_keep(16))
    assert torch.equal(_forward(loaded.eval(), **inputs), _forward(model, **inputs))


def test_a_fresh_model_starts_at_zero_and_trains():
    torch.manual_seed(0)
    model = build_preset("tiny-microdit-original")
    assert not model.mask_token.any()
    inputs = dict(_inputs(), keep_indices=_keep(16))
    out = model(**inputs).sample
    assert not out.detach().any()  # zero-initialised adaLN and output head, as the original
    model.enable_gradient_checkpointing()
    model(**inputs).sample.sub(1).square().mean().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"qkv_multipliers": [0.5, 1.0]}, r"qkv_multipliers must be None or a list of ratios, .* num_layers=3"),
        ({"ffn_multipliers": [0.0]}, r"ffn_multipliers must be a number > 0, got 0.0"),
        ({"patch_mixer_layers": 0}, "patch_mixer_dim is set but patch_mixer_layers is 0"),
        ({"patch_mixer_dim": 12}, "patch_mixer_dim 12 is not a multiple of attention_head_dim 8"),
        ({"patch_mixer_layers": -1}, "patch_mixer_layers must be an int >= 0"),
        ({"num_experts": 0}, "num_experts must be a positive int or None"),
        ({"prediction_type": "score"}, "prediction_type must be None"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        MicroDiTOriginalTransformer(**preset_config("tiny-microdit-original", **overrides))


def test_the_microshapes_config_is_the_preset_at_the_old_configs_widths():
    """configs/microshapes_microdit_original.yaml: preset microshapes-microdit-original, with the token width, depth,
    mixer depth, experts and masking of configs/microshapes_microdit.yaml."""
    new = yaml.safe_load((ROOT / "configs" / "microshapes_microdit_original.yaml").read_text())
    old = yaml.safe_load((ROOT / "configs" / "microshapes_microdit.yaml").read_text())
    assert new["model"]["cls"] == "MicroDiTOriginalTransformer"
    assert new["model"]["kwargs"] == preset_config("microshapes-microdit-original")
    shared = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "sample_size",
              "patch_size", "caption_channels", "patch_mixer_layers", "num_experts", "expert_capacity")  # fmt: skip
    assert {k: new["model"]["kwargs"][k] for k in shared} == {k: old["model"]["kwargs"][k] for k in shared}
    assert {k: v for k, v in new.items() if k != "model"} == {k: v for k, v in old.items() if k != "model"}
