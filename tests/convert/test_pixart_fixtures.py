"""Parity with the original PixArt-α / PixArt-Σ model code, through the public loading path.

The fixtures (``../shared/fixtures/pixart_original``, made by running the original repositories' model classes
with random weights, see its README) hold each case's original state dict, inputs and outputs. Every case and
input variant is loaded with :func:`dit.convert.load_original_pixart` and compared in fp32.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit.convert import load_original_pixart
from tests.tiny import assert_fp32_close

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "pixart_original"
if not (FIXTURES / "cases.json").is_file():
    pytest.skip(f"PixArt original-code fixtures not found at {FIXTURES}", allow_module_level=True)

CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
VARIANTS = [(case, variant["name"]) for case, spec in CASES.items() for variant in spec["variants"]]


def _model(case: str, use_ema: bool = False) -> torch.nn.Module:
    """The case's original checkpoint loaded as PixArt's own inference does (released: ``{"state_dict": ...}``)."""
    spec = CASES[case]
    kwargs = spec["constructor_kwargs"]
    checkpoint = {"state_dict": load_file(FIXTURES / spec["files"]["state"])}
    if "state_ema" in spec["files"]:
        checkpoint["state_dict_ema"] = load_file(FIXTURES / spec["files"]["state_ema"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no KV-compression parameters: told by kv_compress where it matters
        model = load_original_pixart(
            checkpoint,
            sample_size=kwargs["input_size"],
            attention_head_dim=kwargs["hidden_size"] // kwargs["num_heads"],
            kv_compress=kwargs.get("kv_compress_config") or False,
            use_ema=use_ema,
        )
    return model.eval()


def _run(model: torch.nn.Module, io: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """Our forward on the original's inputs: y (B, 1, L, C) -> (B, L, C), data_info -> added_cond_kwargs."""
    added = None
    if f"img_hw__{variant}" in io and model.use_additional_conditions:
        added = {"resolution": io[f"img_hw__{variant}"], "aspect_ratio": io[f"aspect_ratio__{variant}"]}
    with torch.no_grad():
        return model(
            io[f"x__{variant}"],
            encoder_hidden_states=io[f"y__{variant}"][:, 0],
            timestep=io[f"t__{variant}"],
            added_cond_kwargs=added,
            encoder_attention_mask=io.get(f"mask__{variant}"),
        ).sample


@pytest.fixture(scope="module")
def models() -> dict:
    return {}


@pytest.mark.parametrize(("case", "variant"), VARIANTS, ids=[f"{c}-{v}" for c, v in VARIANTS])
def test_fixture_matches_original(models, case, variant):
    spec = CASES[case]
    io = load_file(FIXTURES / spec["files"]["io"])
    use_ema = "state_ema" in spec["files"]
    if (case, use_ema) not in models:
        models[case, use_ema] = _model(case, use_ema=use_ema)
    assert_fp32_close(_run(models[case, use_ema], io, variant), io[f"out__{variant}"])


def test_training_checkpoint_raw_weights(tmp_path):
    """``use_ema=False`` takes the raw ``state_dict`` of a training checkpoint, also from a ``.pth`` file."""
    spec = CASES["sigma_train_ckpt"]
    io = load_file(FIXTURES / spec["files"]["io"])
    raw = load_file(FIXTURES / spec["files"]["state"])
    path = tmp_path / "epoch_1_step_10.pth"
    torch.save({"state_dict": raw, "state_dict_ema": load_file(FIXTURES / spec["files"]["state_ema"])}, path)
    for use_ema, out in ((False, "out_raw"), (True, "out")):
        model = load_original_pixart(path, sample_size=16, attention_head_dim=12, allow_pickle=True, use_ema=use_ema)
        assert_fp32_close(_run(model.eval(), io, "grid8x8"), io[f"{out}__grid8x8"])


@pytest.mark.parametrize("case", ["sigma_ms_ave_kv", "sigma_qk_norm", "sigma_ms_conv_kv"])
def test_converted_model_saves_and_reloads(tmp_path, case):
    """The new config fields (``kv_compress_padding``, ``ave``, ``qk_norm``) survive ``save_pretrained``."""
    from dit import PixArtTransformer

    spec = CASES[case]
    io, variant = load_file(FIXTURES / spec["files"]["io"]), spec["variants"][-1]["name"]
    _model(case).save_pretrained(tmp_path)
    reloaded = PixArtTransformer.from_pretrained(tmp_path).eval()
    assert_fp32_close(_run(reloaded, io, variant), io[f"out__{variant}"])
