"""Parity with Sony's original MicroDiT code, through the public loader :func:`dit.convert.load_original_microdit`.

The fixtures (``../shared/fixtures/microdit_original``, made by running ``micro_diffusion``'s ``DiT`` with random
weights, see its README) hold each case's original state dict, inputs and outputs. Every variant runs as
``model(x, timestep=c_noise, encoder_hidden_states=y, keep_indices=ids_keep)`` (the CFG variant as a conditional and
a zero-caption call combined by ``classifier_free_guidance``) and is compared in fp32. The checkpoint formats, the
named published config and the error paths need no fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit import MicroDiTOriginalTransformer
from dit.checkpoint import CheckpointKeyError
from dit.convert import convert_microdit_original_state_dict, load_original_microdit
from dit.convert.microdit_original import ORIGINAL_CONFIGS, config_from_original
from dit.models.presets import build_preset, preset_config
from dit.nn.embeddings import sincos_2d
from dit.pipelines.guidance import classifier_free_guidance
from tests.tiny import assert_fp32_close, microdit_original_state, randomize_

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "microdit_original"
HAVE_FIXTURES = (FIXTURES / "cases.json").is_file()
needs_fixtures = pytest.mark.skipif(
    not HAVE_FIXTURES, reason=f"MicroDiT original-code fixtures not found at {FIXTURES}"
)
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"] if HAVE_FIXTURES else {}
VARIANTS = [(case, variant["name"]) for case, spec in CASES.items() for variant in spec["variants"]]


def _variant(case: str, name: str) -> dict:
    return next(v for v in CASES[case]["variants"] if v["name"] == name)


def _original(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    spec = CASES[case]
    return load_file(FIXTURES / spec["files"]["state"]), spec["constructor_kwargs"]


def _io(case: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / CASES[case]["files"]["io"])


def _run(model, io: dict[str, torch.Tensor], variant: dict, keep_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Our forward on the original's inputs: y (B, 1, L, C) -> (B, L, C); cfg != 1 as two calls."""
    name = variant["name"]
    x, t, y = io[f"x__{name}"], io[f"t__{name}"], io[f"y__{name}"][:, 0]
    if keep_indices is None:
        keep_indices = io.get(f"ids_keep__{name}")
    with torch.no_grad():
        cond = model(x, timestep=t, encoder_hidden_states=y, keep_indices=keep_indices).sample
        if variant["cfg"] == 1.0:
            return cond
        null = model.null_caption(y.shape[0], y.shape[1])  # the original's unconditional branch: zeros
        uncond = model(x, timestep=t, encoder_hidden_states=null).sample
    return classifier_free_guidance(uncond, cond, variant["cfg"])


@pytest.fixture(scope="module")
def models() -> dict[str, MicroDiTOriginalTransformer]:
    return {case: load_original_microdit(*_original(case)).eval() for case in CASES}


@needs_fixtures
@pytest.mark.parametrize("case, name", VARIANTS, ids=[f"{c}-{n}" for c, n in VARIANTS])
def test_every_variant_matches_the_original(models, case, name):
    io = _io(case)
    assert_fp32_close(_run(models[case], io, _variant(case, name)), io[f"out__{name}"])


@needs_fixtures
@pytest.mark.parametrize("case, name", [v for v in VARIANTS if _variant(*v)["mask_ratio"] > 0])
def test_ascending_kept_indices_give_the_same_output(models, case, name):
    """The trainer passes ascending indices; the original keeps its shuffle order: equal up to summation order."""
    io = _io(case)
    keep = io[f"ids_keep__{name}"]
    assert not torch.equal(keep, keep.sort(dim=1).values)  # the recorded draw is shuffled
    out = _run(models[case], io, _variant(case, name), keep_indices=keep.sort(dim=1).values)
    assert_fp32_close(out, io[f"out__{name}"])
    removed = io[f"token_mask__{name}"].bool()  # (B, T): 1 at removed patches
    assert removed.sum(1).tolist() == [io[f"x__{name}"].shape[-1] ** 2 // 4 - keep.shape[1]] * 2


@needs_fixtures
@pytest.mark.parametrize("case", list(CASES))
def test_widths_and_positions_are_the_originals(models, case):
    spec, model = CASES[case], models[case]
    derived = spec["derived"]
    for block, expected in zip([*model.transformer_blocks], derived["blocks"]):
        _check_block(block, expected)
    for block, expected in zip([*model.patch_mixer], derived["patch_mixer"]):
        _check_block(block, expected)
    table, _ = _original(case)
    grid = derived["grid"]
    torch.testing.assert_close(model.pos_embed.position_table(*grid, torch.device("cpu")), table["pos_embed"])


def _check_block(block, expected: dict) -> None:
    assert block.attn1.heads == expected["attn_heads"] and block.attn1.inner_dim == expected["attn_hidden_dim"]
    assert block.attn2.heads == expected["cross_attn_heads"]
    if expected["ffn"] == "moe":
        assert block.ff.w1.shape == (expected["num_experts"], block.norm1.weight.shape[0], expected["ffn_hidden_dim"])
    else:
        assert block.ff.net[2].weight.shape[1] == expected["ffn_hidden_dim"]


@needs_fixtures
@pytest.mark.parametrize("form", ["state_dict", "latent_diffusion", "composer", "pt", "safetensors", "yaml_config"])
def test_checkpoint_formats(form, tmp_path):
    """A released-style ``{"state_dict": ...}``, a LatentDiffusion state dict (``dit.`` keys beside the VAE's), a
    Composer checkpoint's dict, a ``.pt`` file (read weights-only), a safetensors file, and the config as a YAML
    file all load the same network."""
    import yaml

    state, kwargs = _original("microdit_bias_uniform")
    checkpoint, config, allow_pickle = state, kwargs, False
    if form == "state_dict":
        checkpoint = {"state_dict": state}
    elif form == "latent_diffusion":
        checkpoint = {**{f"dit.{k}": v for k, v in state.items()}, "vae.decoder.conv_in.weight": torch.zeros(1)}
    elif form == "composer":
        checkpoint = {"state": {"model": {f"dit.{k}": v for k, v in state.items()}, "optimizers": {}}, "rng": []}
    elif form == "pt":  # the released files: a plain DiT state dict saved by torch.save
        torch.save(state, tmp_path / "dit.pt")
        checkpoint = tmp_path / "dit.pt"  # weights only: read with weights_only=True, no allow_pickle opt-in
    elif form == "safetensors":
        save_file(state, tmp_path / "dit.safetensors")
        checkpoint = tmp_path / "dit.safetensors"
    else:
        (tmp_path / "dit.yaml").write_text(yaml.safe_dump(kwargs))
        config = tmp_path / "dit.yaml"
    io, variant = _io("microdit_bias_uniform"), _variant("microdit_bias_uniform", "mask75")
    model = load_original_microdit(checkpoint, config, allow_pickle=allow_pickle).eval()
    assert_fp32_close(_run(model, io, variant), io["out__mask75"])


@needs_fixtures
def test_other_latent_sizes_run_where_the_original_crashes(models):
    """The original crashes on 16x12 and 12x12 latents (cases.json crashed_in_original); ours interpolates the
    positions as PixArt does (the table at the training grid is the original's)."""
    model = models["microdit_xl_like"]
    assert {c["name"] for c in CASES["microdit_xl_like"]["crashed_in_original"]} == {"latent16x12", "latent12x12"}
    y = torch.randn(2, 12, 32)
    for size in ((16, 12), (12, 12)):
        with torch.no_grad():
            out = model(torch.randn(2, 4, *size), timestep=torch.tensor([0.1, -0.5]), encoder_hidden_states=y).sample
        assert out.shape == (2, 4, *size) and torch.isfinite(out).all()
    expected = sincos_2d(48, 8, 6, base_size=8, interpolation_scale=2.0)
    torch.testing.assert_close(model.pos_embed.position_table(8, 6, torch.device("cpu"))[0], expected)


# ----- errors -------------------------------------------------------------------------------------------------------
@needs_fixtures
def test_a_missing_or_unknown_key_is_named():
    state, kwargs = _original("microdit_xl_like")
    with pytest.raises(CheckpointKeyError, match=r"1 missing key\(s\): transformer_blocks.2.norm3.weight"):
        load_original_microdit({k: v for k, v in state.items() if k != "blocks.2.norm3.weight"}, kwargs)
    with pytest.raises(KeyError, match="Unrecognised block key 'blocks.0.attn.q_norm.weight'"):
        load_original_microdit({**state, "blocks.0.attn.q_norm.weight": torch.ones(32)}, kwargs)
    with pytest.raises(KeyError, match="Unrecognised key 'y_embedder.y_embedding'"):
        load_original_microdit({**state, "y_embedder.y_embedding": torch.ones(3)}, kwargs)


@needs_fixtures
def test_config_errors_name_the_argument():
    state, kwargs = _original("microdit_xl_like")
    with pytest.raises(ValueError, match=r"pos_interp_scale=1.0, but the checkpoint's pos_embed table is that of "
                                         r"pos_interp_scale=2.0"):  # fmt: skip
        load_original_microdit(state, {**kwargs, "pos_interp_scale": 1.0})
    with pytest.raises(ValueError, match=r"Unknown original MicroDiT argument\(s\) \['mlp_ratio'\]"):
        load_original_microdit(state, {**kwargs, "mlp_ratio": 4.0})
    with pytest.raises(ValueError, match=r"lacks \['multiple_of'\]"):
        load_original_microdit(state, {k: v for k, v in kwargs.items() if k != "multiple_of"})
    with pytest.raises(ValueError, match=r"4 tensor\(s\) of another shape: .*pos_embed.proj.weight: \(48, 4, 2, 2\) "
                                         r"\(model \(48, 16, 2, 2\)\)"):  # fmt: skip
        load_original_microdit(state, kwargs, in_channels=16)
    with pytest.raises(ValueError, match="original_config must be a dict"):
        load_original_microdit(state, "MicroDiT_XXL")


# ----- no fixtures needed ---------------------------------------------------------------------------------------
def test_the_named_published_config_is_the_preset():
    """``original_config="MicroDiT_XL_2"`` at the 512 px stage builds preset MicroDiT-XL-2-original (1.16B)."""
    original = {**ORIGINAL_CONFIGS["MicroDiT_XL_2"], "input_size": 64, "pos_interp_scale": 2.0}
    assert config_from_original(original) == preset_config("MicroDiT-XL-2-original")
    sixteen = config_from_original({**original, "in_channels": 16})
    assert sixteen["in_channels"] == sixteen["out_channels"] == 16


@pytest.mark.parametrize("preset_overrides", [{}, {"attention_bias": True, "patch_mixer_dim": None}],
                         ids=["narrow-mixer-no-bias", "wide-mixer-bias"])  # fmt: skip
def test_converting_an_original_layout_is_exact(preset_overrides):
    """A model written out in the original's layout (every key of cases.json's lists) converts back to itself."""
    torch.manual_seed(0)
    model = randomize_(build_preset("tiny-microdit-original", **preset_overrides), std=0.1).eval()
    original = microdit_original_state(model)
    assert not any(k.startswith(("transformer_blocks", "caption_refiner")) for k in original)
    converted = convert_microdit_original_state_dict(original)
    assert converted.keys() == model.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())
