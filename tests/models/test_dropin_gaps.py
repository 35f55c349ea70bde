"""Model behaviours diffusers' own model tests check, on every backbone: pickle weights written by
``save_pretrained(safe_serialization=False)`` load back weights-only, fused processors are named "Fused...", and a
variant-only folder fails with diffusers' "Error no file named ..." text."""

from __future__ import annotations

import pytest
import torch

from dit import ControlNetAdapter, PixArtTransformer
from dit.nn.attention import DiTAttention, DiTAttnProcessor
from tests.tiny import BACKBONES, FORWARD_VARIANTS, SIGMA, randomize_, variant_inputs, variant_model


def _backbone(name: str) -> torch.nn.Module:
    cls, config = BACKBONES[name]
    torch.manual_seed(0)
    return randomize_(cls(**config), std=0.05).eval()


def _assert_same_state(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[key], value) for key, value in want.items())


# ----- pickle read weights-only, as diffusers reads it ----------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_pickle_weights_from_save_pretrained_load_back_without_opt_in(tmp_path, name):
    """diffusers' test_save_load with safe_serialization=False: .bin read through torch.load(weights_only=True)."""
    model = _backbone(name)
    with pytest.warns(UserWarning, match="pickle"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    _assert_same_state(type(model).from_pretrained(tmp_path), model)


def test_pickle_variant_loads_and_leaving_the_variant_out_gives_diffusers_error_text(tmp_path):
    """diffusers' test_from_save_pretrained_variant: the variant loads; without it, an OSError with its text."""
    model = _backbone("pixart")
    with pytest.warns(UserWarning, match="pickle"):
        model.save_pretrained(tmp_path, variant="fp16", safe_serialization=False)
    _assert_same_state(PixArtTransformer.from_pretrained(tmp_path, variant="fp16"), model)
    with pytest.raises(OSError) as error:
        PixArtTransformer.from_pretrained(tmp_path)
    message = str(error.value)
    assert f"Error no file named diffusion_pytorch_model.bin found in directory {tmp_path}" in message
    assert "variant='fp16'" in message  # our hint, after diffusers' text


# ----- fused processors are recognisable -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_fused_processors_are_named_fused_and_unfusing_restores_the_default(variant):
    model, inputs = randomize_(variant_model(variant), std=0.1), variant_inputs(variant)
    with torch.no_grad():
        expected = model(**inputs)[0]
    model.fuse_qkv_projections()
    processors = model.attn_processors
    assert processors and all(type(p).__name__.startswith("Fused") for p in processors.values())
    assert len(model.original_attn_processors) == len(processors)  # what diffusers' check compares
    assert all(m.fused_projections for m in model.modules() if isinstance(m, DiTAttention))
    with torch.no_grad():
        assert torch.allclose(model(**inputs)[0], expected, atol=1e-6, rtol=0)
    model.unfuse_qkv_projections()
    assert all(type(p) is DiTAttnProcessor for p in model.attn_processors.values())


def test_fusing_keeps_a_processor_that_is_not_the_default():
    """Only the default processors are renamed; another (set before fusing) stays, and stays after unfusing."""

    class MyProcessor(DiTAttnProcessor):
        pass

    model = PixArtTransformer(**SIGMA)
    mine = MyProcessor()
    model.transformer_blocks[0].attn1.set_processor(mine)
    model.fuse_qkv_projections()
    assert model.transformer_blocks[0].attn1.processor is mine
    assert type(model.transformer_blocks[0].attn2.processor).__name__ == "FusedDiTAttnProcessor"
    model.unfuse_qkv_projections()
    assert model.transformer_blocks[0].attn1.processor is mine
    assert type(model.transformer_blocks[1].attn1.processor) is DiTAttnProcessor


def test_fused_adapter_processors_are_named_fused():
    adapter = ControlNetAdapter.from_transformer(PixArtTransformer(**SIGMA), num_blocks=1)
    adapter.fuse_qkv_projections()
    assert all(type(p).__name__.startswith("Fused") for p in adapter.attn_processors.values())
