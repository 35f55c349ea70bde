"""ControlNetAdapter (PixArt-δ) on every backbone: exact zero init, scale 0, I/O, checkpointing, multi-control, slim."""

import copy

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from dit import ControlNetAdapter, PixArtTransformer
from dit.checkpoint import CheckpointKeyError
from dit.models.controlnet import block_controls
from dit.nn.packing import token_layout
from tests.tiny import SIGMA, added_cond, randomize_, tiny_backbone

BACKBONES = {
    "alpha": tiny_backbone("tiny-pixart-alpha", num_layers=4),
    "sigma": tiny_backbone("tiny-pixart", num_layers=4),
    "sigma-kv2": tiny_backbone("tiny-pixart", num_layers=4, kv_compress_ratio=2),
    "lit": tiny_backbone("tiny-lit", num_layers=4),
    "microdit": tiny_backbone("tiny-microdit", num_layers=4),
    "fit": tiny_backbone("tiny-fit", num_layers=4, absolute_position="fractional"),
}
SHAPES = {"square": (8, 8), "wide": (6, 10)}


def _base(name: str = "sigma", seed: int = 0):
    cls, config = BACKBONES[name]
    torch.manual_seed(seed)
    return randomize_(cls(**config), std=0.05).eval()


def _inputs(name: str = "sigma", shape=(8, 8), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    latents, cond = torch.randn(2, 4, *shape, generator=gen), torch.randn(2, 4, *shape, generator=gen)
    text = torch.randn(2, 6, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    added = added_cond(2, 8 * shape[0], 8 * shape[1]) if name == "alpha" else None
    kwargs = dict(encoder_attention_mask=mask, added_cond_kwargs=added)
    return latents, text, torch.tensor([10, 700]), cond, kwargs


def _randomize_projections(adapter, std: float = 0.2, seed: int = 2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for proj in [adapter.before_proj, *(b.after_proj for b in adapter.controlnet_blocks)]:
            proj.weight.normal_(0.0, std)
            proj.bias.normal_(0.0, std)
    return adapter


def _run(base, adapters, x, text, t, conds, scales=1.0, **kwargs):
    controls = block_controls(base, adapters, conds, scales)
    return base(x, text, t, block_controls=controls, **kwargs).sample


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", BACKBONES)
def test_zero_init_gives_the_base_output_exactly(name, shape):
    base = _base(name)
    adapter = ControlNetAdapter.from_transformer(base, num_blocks=3)
    x, text, t, cond, kwargs = _inputs(name, shape)
    with torch.no_grad():
        expected = base(x, text, t, **kwargs).sample
        assert torch.equal(_run(base, adapter, x, text, t, cond, **kwargs), expected)
        for block in adapter.controlnet_blocks:  # before_proj stays zero: the copies still see the base's states
            block.after_proj.weight.normal_(0.0, 0.2)
        changed = _run(base, adapter, x, text, t, cond, **kwargs)
    assert changed.shape == expected.shape and (changed - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_gives_trainable_copies_of_its_blocks(name):
    base = _base(name)
    adapter = ControlNetAdapter.from_transformer(base, positions=[0, 2])
    assert adapter.config.transformer_class == type(base).__name__ and adapter.positions == [0, 2]
    for block, p in zip(adapter.controlnet_blocks, [0, 2]):
        ours, theirs = block.transformer_block, base.transformer_blocks[p]
        assert type(ours) is type(theirs) and ours is not theirs
        assert ours.attn1.kernel == theirs.attn1.kernel
        assert (ours.attn1.kv_compress is None) == (theirs.attn1.kv_compress is None)
        for (key, mine), value in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(mine, value) and mine.data_ptr() != value.data_ptr(), key
    assert all(p.requires_grad for p in adapter.parameters())
    assert not adapter.before_proj.weight.any() and not adapter.controlnet_blocks[1].after_proj.weight.any()
    assert ControlNetAdapter.from_transformer(base.to(torch.bfloat16), num_blocks=1).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_scale_zero_is_the_base_exactly(shape):
    base = _base()
    adapter = _randomize_projections(ControlNetAdapter.from_transformer(base, num_blocks=3))
    x, text, t, cond, kwargs = _inputs(shape=shape)
    assert block_controls(base, adapter, cond, 0.0) is None
    with torch.no_grad():
        expected = base(x, text, t, **kwargs).sample
        assert torch.equal(_run(base, adapter, x, text, t, cond, 0.0, **kwargs), expected)
        assert not torch.allclose(_run(base, adapter, x, text, t, cond, 1.0, **kwargs), expected)


def test_save_load_round_trip_is_exact_and_safetensors_only(tmp_path):
    base = _base("lit")
    adapter = _randomize_projections(ControlNetAdapter.from_transformer(base, positions=[1, 2]))
    adapter.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = ControlNetAdapter.from_pretrained(tmp_path).eval()
    assert loaded.positions == [1, 2] and loaded.controlnet_blocks[0].transformer_block.attn1.kernel == "linear"
    x, text, t, cond, kwargs = _inputs()
    with torch.no_grad():
        assert torch.equal(
            _run(base, loaded, x, text, t, cond, **kwargs), _run(base, adapter, x, text, t, cond, **kwargs)
        )
    with pytest.warns(UserWarning, match="pickle"):
        adapter.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    state = {k: v for k, v in adapter.state_dict().items() if k != "before_proj.bias"}
    from safetensors.torch import save_file

    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointKeyError, match="before_proj.bias"):
        ControlNetAdapter.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["alpha", "sigma-kv2"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name):
    base = _base(name).requires_grad_(False)
    adapter = _randomize_projections(ControlNetAdapter.from_transformer(base, num_blocks=3)).train()
    x, text, t, cond, kwargs = _inputs(name, (6, 10))

    def loss_and_grads():
        adapter.zero_grad()
        loss = _run(base, adapter, x, text, t, cond, **kwargs).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in adapter.named_parameters()}

    plain_loss, plain = loss_and_grads()
    adapter.enable_gradient_checkpointing()
    base.enable_gradient_checkpointing()
    calls = []
    original = adapter._gradient_checkpointing_func
    adapter._gradient_checkpointing_func = lambda *args: calls.append(1) or original(*args)
    loss, grads = loss_and_grads()
    assert len(calls) == 3 and torch.equal(loss, plain_loss)
    assert all(base_param.grad is None for base_param in base.parameters())
    for n, grad in plain.items():
        assert grad.abs().sum() > 0, n
        torch.testing.assert_close(grads[n], grad, rtol=1e-5, atol=1e-7, msg=n)


def test_multi_control_sums_adapters_each_with_its_own_scale():
    base = _base()
    a = _randomize_projections(ControlNetAdapter.from_transformer(base, num_blocks=3), seed=3)
    b = _randomize_projections(ControlNetAdapter.from_transformer(base, positions=[1, 2]), seed=4)
    x, text, t, cond, kwargs = _inputs()
    other = torch.randn_like(cond)
    with torch.no_grad():
        single = _run(base, a, x, text, t, cond, 0.6, **kwargs)
        # each adapter reads the base's hidden states, not the other's output: a + its copy at 0.25/0.35 = a at 0.6
        split = _run(base, [a, copy.deepcopy(a)], x, text, t, [cond, cond], [0.25, 0.35], **kwargs)
        torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-6)
        assert torch.equal(_run(base, [a, b], x, text, t, [cond, other], [0.6, 0.0], **kwargs), single)
        both = _run(base, [a, b], x, text, t, [cond, other], [0.6, 1.5], **kwargs)
        swapped = _run(base, [b, a], x, text, t, [other, cond], [1.5, 0.6], **kwargs)
    torch.testing.assert_close(both, swapped, rtol=1e-5, atol=1e-6)
    assert (both - single).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 ControlNet adapters need as many control latents and scales"):
        block_controls(base, [a, b], [cond], [1.0, 1.0])


@pytest.mark.parametrize("skipped", [0, 1, 2])
def test_slim_adapter_at_chosen_positions_equals_skipping_the_others(skipped):
    base = _base()
    full = _randomize_projections(ControlNetAdapter.from_transformer(base, num_blocks=3))
    slim = full.select([p for p in full.positions if p != skipped])
    assert slim.positions == [p for p in (0, 1, 2) if p != skipped]
    assert slim.num_parameters() < full.num_parameters()
    x, text, t, cond, kwargs = _inputs(shape=(6, 10))
    with torch.no_grad():
        expected = _run(base, slim, x, text, t, cond, **kwargs)
        bypassed = full.controlnet_blocks[full.positions.index(skipped)]
        bypassed.forward = lambda control, *inputs: (control, torch.zeros_like(control))
        assert torch.equal(_run(base, full, x, text, t, cond, **kwargs), expected)


def test_bad_input_names_the_problem():
    base = _base()
    with pytest.raises(ValueError, match="num_blocks=4 does not fit a base with 4 blocks.*between 1 and 3"):
        ControlNetAdapter.from_transformer(base, num_blocks=4)
    with pytest.raises(ValueError, match="distinct, ascending"):
        ControlNetAdapter.from_transformer(base, positions=[2, 1])
    with pytest.raises(TypeError, match="not a toolkit backbone"):
        ControlNetAdapter.from_transformer(PixArtTransformer2DModel(**BACKBONES["sigma"][1]))
    adapter = ControlNetAdapter.from_transformer(base, num_blocks=3)
    wider = PixArtTransformer(**{**SIGMA, "num_layers": 4, "attention_head_dim": 16, "cross_attention_dim": 32})
    with pytest.raises(ValueError, match="built for a base of width 24; the transformer has width 32"):
        block_controls(wider, adapter, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="feeds base block 3; the transformer has only 3 blocks"):
        block_controls(PixArtTransformer(**{**SIGMA, "num_layers": 3}), adapter, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"control latent \(batch, 4, height, width\)"):
        block_controls(base, adapter, torch.zeros(1, 3, 8, 8))
    x, text, t, _, _ = _inputs()
    with torch.no_grad(), pytest.raises(ValueError, match="control latent is 6x10; the model's latents are 8x8"):
        _run(base, adapter, x, text, t, torch.zeros(2, 4, 6, 10))
    with pytest.raises(ValueError, match="not in this adapter"):
        adapter.select([3])


def test_adapter_follows_the_base_attention_backend():
    base = _base()
    adapter = _randomize_projections(ControlNetAdapter.from_transformer(base, num_blocks=2))
    x, text, t, cond, kwargs = _inputs()
    with torch.no_grad():
        sdpa = _run(base, adapter, x, text, t, cond, **kwargs)
        base.set_attention_backend("math")
        math = _run(base, adapter, x, text, t, cond, **kwargs)
    assert adapter.controlnet_blocks[0].transformer_block.attn2.backend.name == "math"
    assert (sdpa - math).abs().max() <= 1e-5


def test_fit_control_is_embedded_like_the_latents_and_needs_one_size():
    """On FiT the control latent goes through the base's own patch embedding and fractional position: the loop
    written out, then a mixed-size batch is refused by name."""
    base = _base("fit")
    adapter = _randomize_projections(ControlNetAdapter.from_transformer(base, num_blocks=1))
    x, text, t, cond, kwargs = _inputs("fit", (6, 10))
    seen = {}
    base.transformer_blocks[0].register_forward_pre_hook(lambda m, args: seen.update(inputs=args[1:]))
    base.norm_out.register_forward_pre_hook(lambda m, args: seen.update(final=args[0].clone()))
    layout = token_layout(torch.tensor([[3, 5], [3, 5]]), (3, 5))
    with torch.no_grad():
        _run(base, adapter, x, text, t, cond, **kwargs)
        inputs = seen["inputs"]
        h = base.transformer_blocks[0](base._embed(x, layout), *inputs)
        c = adapter.controlnet_blocks[0].transformer_block(h + adapter.before_proj(base._embed(cond, layout)), *inputs)
        h = h + adapter.controlnet_blocks[0].after_proj(c)
        for block in base.transformer_blocks[1:]:
            h = block(h, *inputs)
    torch.testing.assert_close(seen["final"], h, rtol=1e-5, atol=1e-6)
    padded = dict(kwargs, image_sizes=torch.tensor([[6, 10], [4, 4]]))
    with (
        torch.no_grad(),
        pytest.raises(
            ValueError, match=r"one image size that fills the canvas; this batch mixes \[\(2, 2\), \(3, 5\)\]"
        ),
    ):
        _run(base, adapter, x, text, t, cond, **padded)
    with torch.no_grad(), pytest.raises(ValueError, match="control latent is 6x8; the model's latents are 6x10"):
        _run(base, adapter, x, text, t, cond[..., :8], **kwargs)


def test_matches_the_pixart_delta_loop_written_out():
    """Base block 0, then c = copy_0(x + before_proj(embed(control))); x = block_i(x + after_proj_{i-1}(c)) for
    i = 1..N with c = copy_{i-1}(c) (PixArt-δ's ControlPixArtHalf), then the remaining base blocks."""
    base = _base("alpha")
    adapter = _randomize_projections(ControlNetAdapter.from_transformer(base, num_blocks=2))
    x, text, t, cond, kwargs = _inputs("alpha", (6, 10))
    seen = {}
    base.transformer_blocks[0].register_forward_pre_hook(lambda m, args: seen.update(inputs=args[1:]))
    base.norm_out.register_forward_pre_hook(lambda m, args: seen.update(final=args[0].clone()))
    with torch.no_grad():
        _run(base, adapter, x, text, t, cond, **kwargs)
        inputs = seen["inputs"]
        h = base.transformer_blocks[0](base.pos_embed(x), *inputs)
        c = h + adapter.before_proj(base.pos_embed(cond))
        for i, block in enumerate(base.transformer_blocks[1:], start=1):
            if i <= 2:
                c = adapter.controlnet_blocks[i - 1].transformer_block(c, *inputs)
                h = h + adapter.controlnet_blocks[i - 1].after_proj(c)
            h = block(h, *inputs)
    torch.testing.assert_close(seen["final"], h, rtol=1e-5, atol=1e-6)
