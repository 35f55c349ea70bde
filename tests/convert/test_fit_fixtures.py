"""Parity with the original FiT / FiTv2 code, through the public loader, and the converter's mapping and errors.

The fixtures (``../shared/fixtures/fit_original``, made by running the original ``FiT`` with random weights, see its
README) hold each case's state dict, inputs and outputs, with latent views of both. Every variant is loaded with
:func:`dit.convert.load_original_fit` from the case's constructor arguments and run in the project's convention:
FiTv2 as ``model(latent, timestep=1000 * sigma, ...)`` with ``sigma = 1 - t``, returning ``noise - data`` (minus the
original's velocity); FiT v1 with its DDPM timesteps. ``forward_with_cfg`` is the conditional and null halves through
:func:`dit.pipelines.guidance.classifier_free_guidance` on 3 channels. The tests below the fixtures need none: a
tiny original-format state dict checks where each weight lands, the round trip and the error paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from dit import FiTTransformer
from dit.checkpoint import CheckpointKeyError
from dit.convert import fit_config, load_original_fit, read_fit_config
from dit.nn.packing import patchify, unpatchify
from dit.pipelines.guidance import classifier_free_guidance
from tests.tiny import FIT_ORIGINALS, FIT_V2, assert_fp32_close, fit_original_state

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "fit_original"
HAVE_FIXTURES = (FIXTURES / "cases.json").is_file()
needs_fixtures = pytest.mark.skipif(not HAVE_FIXTURES, reason=f"FiT original-code fixtures not found at {FIXTURES}")
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"] if HAVE_FIXTURES else {}
VARIANTS = [(case, variant["name"]) for case, spec in CASES.items() for variant in spec["variants"]]


def _most_tokens(spec: dict) -> int:
    """The training length, or the longest sample of the case: FiT has no length check, ours needs ``max_tokens``."""
    grids = [h * w for variant in spec["variants"] for h, w in variant["token_grids"]]
    return max(spec["constructor_kwargs"]["context_size"], *grids)


def _load_case(case: str, checkpoint=None, original_config=None) -> FiTTransformer:
    spec = CASES[case]
    checkpoint = FIXTURES / spec["files"]["state"] if checkpoint is None else checkpoint
    original_config = spec["constructor_kwargs"] if original_config is None else original_config
    return load_original_fit(checkpoint, original_config, max_tokens=_most_tokens(spec))


def _public(config) -> dict:
    """A model config without diffusers' bookkeeping (``_name_or_path``, ``_use_default_values``)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _run(model: FiTTransformer, io: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """Our forward on the case's latent view, in the original's output convention (FiTv2: data - noise)."""
    t = io[f"t__{variant}"]
    sit = model.config.timestep_convention == "sit"
    with torch.no_grad():
        out = model(
            io[f"latent__{variant}"],
            timestep=1000 * (1 - t) if sit else t,  # FiTv2: sigma = 1 - t; FiT v1: the DDPM step
            class_labels=io[f"y__{variant}"],
            image_sizes=io[f"image_sizes__{variant}"],
        ).sample
    return -out if sit else out


def _with_cfg(out: torch.Tensor, scale: float) -> torch.Tensor:
    """FiT's ``forward_with_cfg`` on our outputs of [cond; null] rows: both halves hold the guided latent channels
    0-2, and each its own channel 3."""
    cond, uncond = out.chunk(2)
    guided = classifier_free_guidance(uncond, cond, scale, guidance_channels=3)  # (B, C, H, W), cond's channel 3
    return torch.cat([guided, torch.cat([guided[:, :3], uncond[:, 3:]], dim=1)])


@pytest.fixture(scope="module")
def models() -> dict:
    return {}


@needs_fixtures
@pytest.mark.parametrize(("case", "variant"), VARIANTS, ids=[f"{c}-{v}" for c, v in VARIANTS])
def test_fixture_matches_original(models, case, variant):
    if case not in models:
        models[case] = _load_case(case)
    io = load_file(FIXTURES / CASES[case]["files"]["io"])
    out = _run(models[case], io, variant)
    scale = next(v["cfg_scale"] for v in CASES[case]["variants"] if v["name"] == variant)
    assert_fp32_close(out if scale is None else _with_cfg(out, scale), io[f"out_latent__{variant}"])


@needs_fixtures
def test_fixture_from_published_yaml_and_pickle(tmp_path):
    """The published layout: a YAML whose ``diffusion.network_config.params`` are the arguments, and a ``.bin``."""
    spec = CASES["fitv2_vision_ntk"]
    network = {"target": "fit.model.fit_model.FiT", "params": spec["constructor_kwargs"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"diffusion": {"network_config": network}}))
    torch.save(load_file(FIXTURES / spec["files"]["state"]), tmp_path / "model_ema.bin")
    model = load_original_fit(tmp_path / "model_ema.bin", tmp_path / "config.yaml")  # weights only: no opt-in
    io = load_file(FIXTURES / spec["files"]["io"])
    assert_fp32_close(_run(model, io, "grid10x16"), io["out_latent__grid10x16"])


@needs_fixtures
@pytest.mark.parametrize(("case", "variant"), [("fitv1_base", "mixed6x10_8x8_ddpm_t"), ("fitv2_ntkpro2", "grid10x10")])
def test_converted_fixture_round_trips(tmp_path, case, variant):
    model = _load_case(case)
    model.save_pretrained(tmp_path)
    loaded = FiTTransformer.from_pretrained(tmp_path)
    assert _public(loaded.config) == _public(model.config)
    io = load_file(FIXTURES / CASES[case]["files"]["io"])
    assert torch.equal(_run(loaded, io, variant), _run(model, io, variant))


# ----- the mapping, the round trip and the errors (no fixtures) -------------------------------------------------
def _linear(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """The original's layer ``name`` applied to ``x``."""
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_weights_land_where_fit_computes_them(version):
    """Patch embedding on (c p1 p2) tokens, output projection unpatchified as FiT does (FiTv2: sign flipped), the
    SwiGLU, the blocks' modulation (FiT v1: full adaLN) and the output head's modulation."""
    config, state = FIT_ORIGINALS[version], fit_original_state(FIT_ORIGINALS[version])
    model = load_original_fit(state, config)
    p, h, w, width = 2, 2, 3, 32
    latents = torch.randn(1, 4, h * p, w * p)
    fit_tokens = latents.reshape(1, 4, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(1, h * w, 16)  # (c p1 p2)
    torch.testing.assert_close(model.x_embedder(patchify(latents, p)), _linear(state, "x_embedder.proj", fit_tokens))

    x = torch.randn(1, h * w, width)
    fit_out = _linear(state, "final_layer.linear", x)  # (1, N, p*p*C')
    fit_image = fit_out.reshape(1, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(1, -1, h * p, w * p)
    sign = -1 if version == "v2" else 1
    torch.testing.assert_close(unpatchify(model.proj_out(x), (h, w), p), sign * fit_image)

    gated = F.silu(_linear(state, "blocks.1.mlp.fc1_g", x)) * _linear(state, "blocks.1.mlp.fc1_x", x)
    swiglu = _linear(state, "blocks.1.mlp.fc2", gated)
    torch.testing.assert_close(model.transformer_blocks[1].ff(x), swiglu)

    cond, modulation = F.silu(torch.randn(1, width)), "blocks.1.adaLN_modulation"
    if version == "v1":  # per block SiLU -> Linear(D, 6D), no global modulation
        fit_mod = _linear(state, f"{modulation}.1", cond)
    else:  # global SiLU -> Linear(D, 6D) plus the block's SiLU -> Linear(D, r) -> Linear(r, 6D)
        low_rank = _linear(state, f"{modulation}.2", _linear(state, f"{modulation}.1", cond))
        fit_mod = _linear(state, "global_adaLN_modulation.1", cond) + low_rank
    ours = model.adaln_shared(cond) + model.transformer_blocks[1].adaln_lora(cond)
    torch.testing.assert_close(ours, fit_mod)
    torch.testing.assert_close(model.norm_out.linear(cond), _linear(state, "final_layer.adaLN_modulation.1", cond))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_converted_model_round_trips(tmp_path, version):
    """save_pretrained / from_pretrained keeps every converted config option and the outputs, bit for bit."""
    model = load_original_fit(
        fit_original_state(FIT_ORIGINALS[version]), FIT_ORIGINALS[version], rope_extrapolation="vision_pi"
    )
    expected = {"v1": ("fit_v1", "epsilon", 8), "v2": ("sit", "flow", 4)}[version]
    assert (model.config.timestep_convention, model.config.prediction_type, model.out_channels) == expected
    model.save_pretrained(tmp_path)
    loaded = FiTTransformer.from_pretrained(tmp_path)
    assert _public(loaded.config) == _public(model.config) and loaded.config.output_head == "silu"
    latents, sizes = torch.randn(2, 4, 6, 10), torch.tensor([[6, 10], [4, 4]])
    kwargs = dict(timestep=torch.tensor([300.0, 700.0]), class_labels=torch.tensor([1, 5]), image_sizes=sizes)
    with torch.no_grad():
        assert torch.equal(loaded(latents, **kwargs).sample, model(latents, **kwargs).sample)


def test_config_forms_agree(tmp_path):
    """The whole YAML, its network config and the bare arguments give one config; a YAML path too."""
    network = {"target": "fit.model.fit_model.FiT", "params": FIT_V2}
    whole = {"diffusion": {"transport": {"path_type": "Linear", "prediction": "velocity"}, "network_config": network}}
    (tmp_path / "fitv2.yaml").write_text(yaml.safe_dump(whole))
    forms = [FIT_V2, network, whole, tmp_path / "fitv2.yaml", str(tmp_path / "fitv2.yaml")]
    configs = [fit_config(read_fit_config(form)) for form in forms]
    assert all(config == configs[0] for config in configs)
    assert configs[0]["train_grid"] == [4, 4] and configs[0]["sample_size"] == 8 and configs[0]["max_tokens"] == 16


@pytest.mark.parametrize(
    ("custom_freqs", "decouple", "expected"),
    [("normal", True, "none"), ("linear", True, "vision_pi"), ("ntk-aware", False, "ntk"),
     ("NTK-by-parts", True, "vision_ntk_by_parts"), ("yarn", False, "yarn"), ("ntk-aware-pro1", False, "ntk_pro1"),
     ("ntk-aware-pro2", True, "vision_ntk_pro2")],
)  # fmt: skip
def test_extrapolation_names(custom_freqs, decouple, expected):
    config = {**FIT_V2, "custom_freqs": custom_freqs, "decouple": decouple, "ori_max_pe_len": 4, "online_rope": True}
    assert fit_config(read_fit_config(config))["rope_extrapolation"] == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [({"adaln_type": "swiglu"}, "adaln_type='swiglu' is not supported"),
     ({"use_swiglu": False}, "use_swiglu=False is not supported"),
     ({"qk_norm_weight": True}, "qk_norm_weight=True"), ({"time_shifting": 2}, "time_shifting=2"),
     ({"q_norm": None}, "q_norm=None and k_norm='layernorm' differ"), ({"learn_sigma": True}, "learn_sigma and use_sit"),
     ({"class_dropout_prob": 0.0}, "no null class"), ({"custom_freqs": "dynamic"}, "custom_freqs 'dynamic' is not"),
     ({"custom_freqs": "yarn"}, "needs ori_max_pe_len"), ({"hidden_size": 33}, "not a multiple of num_heads"),
     ({"adaln_lora_dim": None}, "needs adaln_lora_dim"), ({"bogus": 1}, "unknown argument.*bogus")],
)  # fmt: skip
def test_unsupported_settings_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        fit_config(read_fit_config({**FIT_V2, **change}))


@pytest.mark.parametrize(
    ("config", "message"),
    [({"target": "fit.model.other.DiT", "params": FIT_V2}, "not FiT"), ({}, "found none"),
     ({"diffusion": {"transport": {"prediction": "noise"}, "network_config": {"params": FIT_V2}}}, "'noise'.*'velocity'"),
     ({"diffusion": {"noise_scheduler": {"prediction_type": "epsilon"}, "network_config": {"params": FIT_V2}}},
      "use_sit=True, but")],
)  # fmt: skip
def test_bad_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        read_fit_config(config)
    with pytest.raises(FileNotFoundError, match="No FiT config file"):
        read_fit_config("missing.yaml")


def test_checkpoint_keys_and_shapes_are_strict(tmp_path):
    state = fit_original_state(FIT_V2)
    with pytest.raises(KeyError, match="blocks.0.attn.extra.weight"):
        load_original_fit({**state, "blocks.0.attn.extra.weight": torch.zeros(1)}, FIT_V2)
    with pytest.raises(KeyError, match="'pos_embed'"):
        load_original_fit({**state, "pos_embed": torch.zeros(1)}, FIT_V2)
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn.proj.bias"}
    with pytest.raises(CheckpointKeyError, match="missing key.*transformer_blocks.1.attn1.to_out.0.bias"):
        load_original_fit(missing, FIT_V2)
    with pytest.raises(KeyError, match="blocks.0.mlp.fc1_g.weight has no blocks.0.mlp.fc1_x.weight"):
        load_original_fit({k: v for k, v in state.items() if k != "blocks.0.mlp.fc1_x.weight"}, FIT_V2)
    with pytest.raises(ValueError, match=r"does not fit original_config: .*adaln_lora.linear_1.weight \(8, 32\)"):
        load_original_fit(state, {**FIT_V2, "adaln_lora_dim": 4})
    save_file(state, tmp_path / "model_ema.safetensors")
    assert isinstance(load_original_fit(tmp_path / "model_ema.safetensors", FIT_V2), FiTTransformer)
