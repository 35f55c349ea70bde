"""diffusers' attention-processor API on every backbone and the ControlNet adapter: processors by name, the default
processor, diffusers' processors called as diffusers calls them, exact QKV fusion that keeps the state dict, diffusers'
hooks finding our attention modules, and regional compilation."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dit import ControlNetAdapter, PixArtTransformer
from dit.models.controlnet import block_controls
from dit.nn.attention import DiTAttention, DiTAttnProcessor
from tests.tiny import (
    FORWARD_VARIANTS,
    SIGMA,
    assert_fp32_close,
    diffusers_and_ours,
    randomize_,
    variant_inputs,
    variant_model,
)


def _model(variant: str) -> torch.nn.Module:
    return randomize_(variant_model(variant), std=0.1)


def _sample(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def _attention_names(model) -> list[str]:
    return [f"{name}.processor" for name, m in model.named_modules() if isinstance(m, DiTAttention)]


def _adapter_run(seed: int = 0):
    """A PixArt base, an adapter with random projections and a function running them together."""
    base = _model("sigma-mask")
    adapter = randomize_(ControlNetAdapter.from_transformer(base, num_blocks=1), std=0.1).eval()
    inputs = variant_inputs("sigma-mask")
    cond = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(seed))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return base(**inputs, block_controls=block_controls(base, adapter, cond))[0]

    return base, adapter, run


# ----- processors by name ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_attn_processors_are_named_as_diffusers_names_them_and_set_one_or_by_name(variant):
    model = _model(variant)
    processors = model.attn_processors
    assert list(processors) == _attention_names(model)
    assert "transformer_blocks.0.attn1.processor" in processors
    assert all(type(p) is DiTAttnProcessor for p in processors.values())

    shared = DiTAttnProcessor()
    model.set_attn_processor(shared)
    assert all(p is shared for p in model.attn_processors.values())
    by_name = {name: DiTAttnProcessor() for name in processors}
    model.set_attn_processor(dict(by_name))
    assert model.attn_processors == by_name
    with pytest.raises(ValueError, match="number of processors"):
        model.set_attn_processor({next(iter(processors)): DiTAttnProcessor()})


def test_adapter_has_the_processor_api():
    _, adapter, _ = _adapter_run()
    assert list(adapter.attn_processors) == _attention_names(adapter)
    assert "controlnet_blocks.0.transformer_block.attn2.processor" in adapter.attn_processors
    adapter.set_attn_processor(AttnProcessor2_0())
    adapter.set_default_attn_processor()
    assert all(type(p) is DiTAttnProcessor for p in adapter.attn_processors.values())


def test_diffusers_processor_is_called_as_diffusers_calls_it():
    """diffusers' AttnProcessor2_0 on every attention gives the default processor's and diffusers' model's output; a
    recording processor sees our module, the text for cross-attention and diffusers' (B, 1, L) mask bias."""
    reference, ours = diffusers_and_ours(SIGMA)
    inputs = variant_inputs("sigma-mask")
    expected, default = _sample(reference, inputs), _sample(ours, inputs)
    ours.set_attn_processor(AttnProcessor2_0())
    assert_fp32_close(_sample(ours, inputs), expected)
    assert_fp32_close(_sample(ours, inputs), default)

    calls = []

    class Recording(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            calls.append((attn, encoder_hidden_states, attention_mask, kwargs))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

    ours.set_attn_processor(Recording())
    _sample(ours, inputs)
    cross = [c for c in calls if c[1] is not None]
    assert len(calls) == 4 and len(cross) == 2 and all(isinstance(c[0], DiTAttention) for c in calls)
    mask = cross[0][2]
    assert mask.shape == (2, 1, 12) and mask[0, 0, :3].eq(0).all() and mask[0, 0, 3:].eq(-10000.0).all()
    assert all(c[3] == {} for c in calls)
    ours.set_default_attn_processor()
    assert torch.equal(_sample(ours, inputs), default)


@pytest.mark.parametrize(
    "variant, option", [("lit", "linear kernel"), ("sigma-kv", "compression"), ("fit-mixed", "rotary")]
)
def test_diffusers_processor_on_an_attention_it_cannot_compute_is_a_clear_error(variant, option):
    model = _model(variant)
    model.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=f"AttnProcessor2_0 .*{option}.*DiTAttnProcessor"):
        _sample(model, variant_inputs(variant))


def test_subclass_of_the_default_processor_keeps_the_kernel_inputs():
    model, inputs = _model("fit-mixed"), variant_inputs("fit-mixed")
    seen = []

    class Counting(DiTAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, mask=None, grid=None, rotary=None):
            seen.append(rotary is not None)
            return super().__call__(attn, hidden_states, encoder_hidden_states, mask, grid, rotary)

    expected = _sample(model, inputs)
    model.set_attn_processor(Counting())
    assert torch.equal(_sample(model, inputs), expected)
    assert seen == [True, False] * 2  # self-attention gets the rotary tables, cross-attention none


def test_our_attention_is_an_attention_module_of_diffusers():
    attn = PixArtTransformer(**SIGMA).transformer_blocks[0].attn1
    assert isinstance(attn, Attention) and isinstance(attn, AttentionModuleMixin)
    assert not attn.is_cross_attention and PixArtTransformer(**SIGMA).transformer_blocks[0].attn2.is_cross_attention


# ----- QKV fusion -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_fused_qkv_is_exact_and_keeps_the_state_dict_and_unfuse_restores(variant):
    model, inputs = _model(variant), variant_inputs(variant)
    expected, state = _sample(model, inputs), model.state_dict()
    model.fuse_qkv_projections()
    attentions = [m for m in model.modules() if isinstance(m, DiTAttention)]
    assert all(m.fused_projections for m in attentions)
    assert all(hasattr(m, "to_kv" if m.is_cross_attention else "to_qkv") for m in attentions)
    assert_fp32_close(_sample(model, inputs), expected, tolerance=1e-6)
    fused_state = model.state_dict()
    assert list(fused_state) == list(state)  # no to_qkv / to_kv keys: a fused model saves what it saved before
    assert all(torch.equal(fused_state[k], state[k]) for k in state)

    model.unfuse_qkv_projections()
    assert not any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") or m.fused_projections for m in attentions)
    assert list(model.state_dict()) == list(state)
    assert torch.equal(_sample(model, inputs), expected)


def test_fused_model_saves_and_loads_strictly_and_refreshes_the_fused_weights_on_load(tmp_path):
    model, inputs = _model("sigma-kv"), variant_inputs("sigma-kv")
    other = randomize_(variant_model("sigma-kv"), std=0.1)
    expected, other_expected = _sample(model, inputs), _sample(other, inputs)
    model.fuse_qkv_projections()
    model.save_pretrained(tmp_path)
    loaded = PixArtTransformer.from_pretrained(tmp_path)  # strict: no unexpected fused keys
    assert torch.equal(_sample(loaded, inputs), expected)
    model.load_state_dict(other.state_dict())  # strict; the fused layers take the new weights
    assert_fp32_close(_sample(model, inputs), other_expected, tolerance=1e-6)


def test_fused_adapter_is_exact():
    base, adapter, run = _adapter_run()
    expected = run()
    base.fuse_qkv_projections()
    adapter.fuse_qkv_projections()
    assert adapter.controlnet_blocks[0].transformer_block.attn1.fused_projections
    assert_fp32_close(run(), expected, tolerance=1e-6)


# ----- diffusers' hooks find our attention modules --------------------------------------------------------------
def test_pyramid_attention_broadcast_hooks_every_self_attention():
    model, inputs = _model("sigma-mask"), variant_inputs("sigma-mask")
    expected = _sample(model, inputs)
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: 500,
    )
    apply_pyramid_attention_broadcast(model, config)
    hooked = [
        name for name, m in model.named_modules() if isinstance(m, DiTAttention) and hasattr(m, "_diffusers_hook")
    ]
    assert hooked == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert_fp32_close(_sample(model, inputs), expected)  # first call computes


# ----- regional compilation (diffusers' ModelMixin.compile_repeated_blocks) ---------------------------------------
@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_compile_repeated_blocks_matches_eager(variant):
    model, inputs = _model(variant), variant_inputs(variant)
    expected = _sample(model, inputs)
    model.fuse_qkv_projections()  # the fused path compiles too
    model.compile_repeated_blocks(backend="eager", fullgraph=True)
    compiled = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    assert compiled and all(m._compiled_call_impl is not None for m in compiled)
    assert_fp32_close(_sample(model, inputs), expected, tolerance=1e-6)


@pytest.mark.usefixtures("_fresh_dynamo")
def test_compile_repeated_blocks_on_the_adapter():
    base, adapter, run = _adapter_run()
    expected = run()
    base.compile_repeated_blocks(backend="eager", fullgraph=True)
    adapter.compile_repeated_blocks(backend="eager", fullgraph=True)
    assert adapter.controlnet_blocks[0].transformer_block._compiled_call_impl is not None
    assert_fp32_close(run(), expected, tolerance=1e-6)
