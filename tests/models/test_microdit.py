"""MicroDiT: patch-mixer, deferred and naive token masking, expert-choice MoE, layer-wise scaling."""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit import LiTTransformer, MicroDiTTransformer, PixArtTransformer
from dit.nn.context import BlockContext
from dit.nn.masking import gather_tokens, keep_indices_from_scores, kept_count, patch_loss_mask, scatter_tokens
from dit.nn.moe import ExpertChoiceFeedForward, expert_capacity

BASE = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=4,
    cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24, use_additional_conditions=False,
    interpolation_scale=1,
)  # fmt: skip
SIZES = {"square": (8, 8), "wide": (6, 10)}


def _inputs(size, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, *size, generator=gen)
    text = torch.randn(batch, 5, 24, generator=gen)
    return latents, text, torch.tensor([10, 700])[:batch]


def _keep(batch, n_tokens, ratio=0.75, seed=0):
    scores = torch.rand(batch, n_tokens, generator=torch.Generator().manual_seed(seed))
    return keep_indices_from_scores(scores, kept_count(n_tokens, ratio))


def _token_counts(modules):
    """Record the token count every module of ``modules`` sees."""
    seen, handles = [], []
    for module in modules:
        handles.append(module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1])))
    return seen, handles


def _model(**overrides):
    torch.manual_seed(0)
    return MicroDiTTransformer(**{**BASE, "num_experts": 4, **overrides}).eval()


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "naive"])
def test_masked_tokens_take_no_compute_in_the_backbone(size, deferred):
    model = _model(deferred_masking=deferred)
    latents, text, t = _inputs(size)
    n_tokens = size[0] * size[1] // 4
    keep = _keep(2, n_tokens)
    backbone, backbone_hooks = _token_counts(model.transformer_blocks)
    mixer, mixer_hooks = _token_counts(model.patch_mixer)
    with torch.no_grad():
        model(latents, text, t, keep_indices=keep)
    assert backbone == [keep.shape[1]] * len(model.transformer_blocks)
    assert mixer == [n_tokens if deferred else keep.shape[1]] * len(model.patch_mixer)
    for handle in backbone_hooks + mixer_hooks:
        handle.remove()


def _backbone_flops(model, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args, **kwargs)
    counts = counter.get_flop_counts()
    blocks = [name for name in counts if re.fullmatch(r".*\.transformer_blocks\.\d+", name)]
    assert blocks
    return sum(sum(counts[name].values()) for name in blocks)


def test_backbone_flops_are_those_of_the_kept_tokens_alone():
    """A 64-token image with 16 kept tokens costs the backbone exactly what a 16-token image costs it."""
    model = _model(num_layers=6)
    big, text, t = _inputs((16, 16))  # 64 tokens
    small, _, _ = _inputs((8, 8))  # 16 tokens
    full = _backbone_flops(model, big, text, t)
    masked = _backbone_flops(model, big, text, t, keep_indices=_keep(2, 64, ratio=0.75))
    assert masked == _backbone_flops(model, small, text, t)
    assert masked < 0.26 * full  # what is left over a quarter: the text keys/values of cross-attention


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("cls", [MicroDiTTransformer, PixArtTransformer])
def test_output_is_zero_exactly_at_masked_patches(size, cls):
    model = cls(**BASE).eval() if cls is PixArtTransformer else _model()
    latents, text, t = _inputs(size)
    h, w = size[0] // 2, size[1] // 2
    keep = _keep(2, h * w)
    with torch.no_grad():
        out = model(latents, text, t, keep_indices=keep).sample  # (B, C, H, W)
    kept = patch_loss_mask(keep, (h, w), 2)  # (B, 1, H, W)
    assert torch.all(out * (1 - kept) == 0)
    assert torch.all((out.abs().sum(1, keepdim=True) > 0) == kept.bool())


def test_naive_masking_output_ignores_masked_tokens_and_deferred_does_not():
    latents, text, t = _inputs((8, 8))
    keep = _keep(2, 16)
    changed = latents.clone()
    dropped = patch_loss_mask(keep, (4, 4), 2) == 0  # (B, 1, H, W)
    changed[dropped.expand_as(changed)] += 5.0  # new content only in masked patches
    for deferred, should_change in ((False, False), (True, True)):
        model = _model(deferred_masking=deferred)
        with torch.no_grad():
            a = model(latents, text, t, keep_indices=keep).sample
            b = model(changed, text, t, keep_indices=keep).sample
        assert (not torch.allclose(a, b)) == should_change


def test_inference_never_masks():
    model = _model()
    latents, text, t = _inputs((8, 8))
    seen, hooks = _token_counts(model.transformer_blocks)
    with torch.no_grad():
        out = model(latents, text, t).sample
    assert seen == [16] * len(model.transformer_blocks)
    assert torch.all(out.abs().sum(1) > 0)
    for handle in hooks:
        handle.remove()


def test_pixart_masking_equals_blocks_on_the_gathered_tokens():
    """PixArt's token masking is exactly: embed, gather, blocks, head, scatter."""
    torch.manual_seed(0)
    model = PixArtTransformer(**BASE).eval()
    latents, text, t = _inputs((8, 8))
    keep = _keep(2, 16)
    with torch.no_grad():
        out = model(latents, text, t, keep_indices=keep).sample
        tokens = gather_tokens(model.pos_embed(latents), keep)  # (B, K, D)
        t6, emb = model.adaln_single(t, None, batch_size=2, hidden_dtype=tokens.dtype)
        context = model.caption_projection(text)
        context = BlockContext(encoder_hidden_states=context, shared_modulation=t6)
        for block in model.transformer_blocks:
            tokens = block(tokens, context)
        shift, scale = (model.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        tokens = model.proj_out(model.norm_out(tokens) * (1 + scale) + shift)
        full = scatter_tokens(tokens, keep, 16).reshape(2, 4, 4, 2, 2, 4).permute(0, 5, 1, 3, 2, 4)
    torch.testing.assert_close(out, full.reshape(2, 4, 8, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cls, kwargs",
    [(PixArtTransformer, dict(kv_compress_ratio=2, kv_compress_layers=[0])), (LiTTransformer, {})],
    ids=["kv_compress", "lit_value_conv"],
)
def test_grid_dependent_attention_refuses_masking(cls, kwargs):
    model = cls(**BASE, **kwargs)
    latents, text, t = _inputs((8, 8))
    with pytest.raises(ValueError, match="full grid"):
        model(latents, text, t, keep_indices=_keep(2, 16))


def test_lit_without_value_conv_masks():
    model = LiTTransformer(**BASE, attention_conv_kernel_size=None).eval()
    latents, text, t = _inputs((6, 10))
    with torch.no_grad():
        out = model(latents, text, t, keep_indices=_keep(2, 15)).sample
    assert torch.isfinite(out).all()


def test_bad_keep_indices_and_mixing_with_attention_mask_are_errors():
    model = _model()
    latents, text, t = _inputs((8, 8))
    with pytest.raises(ValueError, match="keep_indices must be"):
        model(latents, text, t, keep_indices=torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(
            latents,
            text,
            t,
            keep_indices=_keep(2, 16),
            attention_mask=torch.ones(2, 16).index_fill(1, torch.tensor([0]), 0),
        )


# ----- expert-choice MoE ----------------------------------------------------------------------------------------
def _reference_expert_choice(moe: ExpertChoiceFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The routing written out per sample and expert."""
    out = torch.zeros_like(x)
    probs = moe.gate(x).softmax(-1)  # (B, T, E)
    k = expert_capacity(x.shape[1], moe.num_experts, moe.capacity_factor)
    for b in range(x.shape[0]):
        for e in range(moe.num_experts):
            weight, index = probs[b, :, e].topk(k)
            hidden = torch.nn.functional.gelu(x[b, index] @ moe.w1[e] + moe.b1[e], approximate="tanh")
            out[b, index] += weight[:, None] * (hidden @ moe.w2[e] + moe.b2[e])
    return out


@pytest.mark.parametrize("tokens, experts, capacity", [(16, 4, 2.0), (15, 8, 2.0), (7, 3, 1.0), (4, 8, 0.5)])
def test_expert_choice_matches_the_written_out_routing_and_respects_capacity(tokens, experts, capacity):
    torch.manual_seed(0)
    moe = ExpertChoiceFeedForward(12, experts, capacity, inner_dim=20)
    with torch.no_grad():
        moe.b1.normal_()
        moe.b2.normal_()
    x = torch.randn(3, tokens, 12)
    torch.testing.assert_close(moe(x), _reference_expert_choice(moe, x), rtol=1e-5, atol=1e-5)
    k = expert_capacity(tokens, experts, capacity)
    assert k == min(tokens, max(1, int(capacity * tokens / experts)))
    stats = moe.routing_stats()
    assert stats["experts_per_token"] == pytest.approx(k * experts / tokens)
    assert 0 < stats["token_coverage"] <= 1 and stats["max_experts_per_token"] <= experts


def test_moe_placement_layerwise_scaling_and_routing_stats():
    model = _model(num_layers=6, patch_mixer_layers=2, attention_multipliers=(0.5, 1.0), ffn_multipliers=(0.5, 4.0))
    moe_blocks = [i for i, b in enumerate(model.transformer_blocks) if isinstance(b.ff, ExpertChoiceFeedForward)]
    assert moe_blocks == [1, 3]  # every other block, the last one excepted
    assert isinstance(model.patch_mixer[1].ff, ExpertChoiceFeedForward)
    heads = [b.attn1.heads for b in model.transformer_blocks]
    assert heads[0] == 1 and heads[-1] == 2
    widths = [
        b.ff.net[0].proj.out_features
        for b in model.transformer_blocks
        if not isinstance(b.ff, ExpertChoiceFeedForward)
    ]
    assert widths[0] == 16 and widths[-1] == 128  # 0.5x and 4x the token width of 32
    latents, text, t = _inputs((8, 8))
    with torch.no_grad():
        model(latents, text, t)
    assert set(model.routing_stats()) == {"token_coverage", "experts_per_token", "max_experts_per_token"}
    assert _model(num_experts=None).routing_stats() == {}


def test_save_load_round_trip_keeps_the_microdit_config(tmp_path):
    model = _model(patch_mixer_layers=1, ffn_multipliers=(1.0, 2.0), deferred_masking=False)
    model.save_pretrained(tmp_path)
    loaded = MicroDiTTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.deferred_masking is False and list(loaded.config.ffn_multipliers) == [1.0, 2.0]
    latents, text, t = _inputs((6, 10))
    keep = _keep(2, 15)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(latents, text, t, keep_indices=keep).sample, model(latents, text, t, keep_indices=keep).sample
        )


def test_gradient_checkpointing_gives_the_same_gradients():
    latents, text, t = _inputs((8, 8))
    keep = _keep(2, 16)
    grads = []
    for checkpointing in (False, True):
        model = _model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(latents, text, t, keep_indices=keep).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
