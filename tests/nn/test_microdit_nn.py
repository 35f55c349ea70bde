"""The nn options MicroDiT as published needs (each checked against its formula written out here): q/k LayerNorm
over the full width without affine parameters, the GELU(tanh) timestep MLP, the caption MLP with a bias-free
LayerNorm, bias-free SwiGLU, exact-GELU experts, the normed cross-attention input; and the original's width rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit.nn.attention import AttentionSpec, DiTAttention
from dit.nn.blocks import SwiGLUFeedForward
from dit.nn.context import BlockContext
from dit.nn.embeddings import CaptionProjection, TimestepEmbedding
from dit.nn.microdit_block import MicroDiTBlock, attention_width, expert_hidden, swiglu_hidden
from dit.nn.moe import ExpertChoiceFeedForward, moe_routing_stats
from tests.tiny import randomize_


def _layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last axis written out, optionally times a weight (no bias)."""
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps)
    return out if weight is None else out * weight


# ----- attention: q/k LayerNorm over the full width, non-affine --------------------------------------------------
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_full_width_qk_norm_without_affine_parameters(cross):
    torch.manual_seed(0)
    spec = AttentionSpec(qk_norm="layer_norm_across_heads", qk_norm_affine=False, qk_norm_eps=1e-3)
    attn = randomize_(DiTAttention(24, 4, 6, cross_attention_dim=16 if cross else None, bias=False, spec=spec))
    assert not any("norm" in key for key in attn.state_dict())  # no parameters: released keys stay as they are
    x, ctx = torch.randn(2, 5, 24), torch.randn(2, 3, 16) if cross else None
    source = x if ctx is None else ctx
    q = _layer_norm(attn.to_q(x), 1e-3)  # (B, N, 24): over all heads at once
    k, v = _layer_norm(attn.to_k(source), 1e-3), attn.to_v(source)
    heads = [t.unflatten(-1, (4, 6)).transpose(1, 2) for t in (q, k, v)]  # (B, H, L, 6)
    expected = attn.to_out[0](F.scaled_dot_product_attention(*heads).transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(x, ctx), expected, rtol=1e-5, atol=1e-5)


def test_qk_norm_options_keep_the_defaults_and_are_checked():
    pixart = DiTAttention(16, 2, 8, spec=AttentionSpec(qk_norm="layer_norm_across_heads"))
    assert pixart.norm_q.eps == 1e-5 and pixart.norm_q.weight is not None and pixart.norm_q.bias is not None
    per_head = DiTAttention(16, 2, 8, spec=AttentionSpec(qk_norm=True))
    assert per_head.norm_q.normalized_shape == (8,) and per_head.norm_q.weight is None and per_head.norm_q.eps == 1e-6
    micro = DiTAttention(16, 2, 8, spec=AttentionSpec(qk_norm="layer_norm_across_heads", qk_norm_affine=False,
                                                      qk_norm_eps=1e-6))  # fmt: skip
    assert micro.norm_q.normalized_shape == (16,) and micro.norm_q.weight is None and micro.norm_q.eps == 1e-6
    with pytest.raises(ValueError, match="options of a QK-norm: set qk_norm too"):
        AttentionSpec(qk_norm_affine=False)
    with pytest.raises(ValueError, match="qk_norm_eps must be None or a number > 0, got 0"):
        AttentionSpec(qk_norm=True, qk_norm_eps=0)
    with pytest.raises(ValueError, match="qk_norm_affine must be None or a bool"):
        AttentionSpec(qk_norm=True, qk_norm_affine="no")


# ----- embeddings ------------------------------------------------------------------------------------------------
def test_timestep_mlp_with_gelu_tanh():
    torch.manual_seed(0)
    embed = randomize_(TimestepEmbedding(512, 16, act_fn="gelu_tanh"))
    x = torch.randn(3, 512)
    expected = embed.linear_2(F.gelu(embed.linear_1(x), approximate="tanh"))
    torch.testing.assert_close(embed(x), expected)
    assert list(embed.state_dict()) == ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"]
    with pytest.raises(ValueError, match="Unknown activation 'relu'"):
        TimestepEmbedding(8, 8, act_fn="relu")


def test_caption_projection_with_a_bias_free_layer_norm():
    torch.manual_seed(0)
    projection = randomize_(CaptionProjection(12, 16, norm_eps=1e-6))
    assert "norm.weight" in projection.state_dict() and "norm.bias" not in projection.state_dict()
    y = torch.randn(2, 5, 12)
    hidden = _layer_norm(F.gelu(projection.linear_1(y), approximate="tanh"), 1e-6, projection.norm.weight)
    torch.testing.assert_close(projection(y), projection.linear_2(hidden), rtol=1e-5, atol=1e-5)
    assert "norm.weight" not in CaptionProjection(12, 16).state_dict()  # PixArt's keys unchanged


# ----- feed-forwards ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_is_w3_of_silu_w1_times_w2(bias):
    """MicroDiT's ``w3(silu(w1 x) * w2 x)`` is the SwiGLU with ``net.0.proj`` = [w2; w1] (value rows first)."""
    torch.manual_seed(0)
    ff = randomize_(SwiGLUFeedForward(8, 6, bias=bias))
    assert ("net.0.proj.bias" in ff.state_dict()) == bias and ("net.2.bias" in ff.state_dict()) == bias
    w2, w1 = ff.net[0].proj.weight.chunk(2)
    x = torch.randn(2, 3, 8)
    expected = ff.net[2](F.silu(F.linear(x, w1, None if not bias else ff.net[0].proj.bias[6:])) * F.linear(
        x, w2, None if not bias else ff.net[0].proj.bias[:6]))  # fmt: skip
    torch.testing.assert_close(ff(x), expected)


def _expert_choice_reference(moe: ExpertChoiceFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Expert choice written out per sample and expert: each expert takes its top-k tokens, exact GELU."""
    probs = (x @ moe.gate.weight.T).softmax(-1)  # (B, T, E)
    k = int(moe.capacity_factor * x.shape[1] / moe.num_experts)
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for e in range(moe.num_experts):
            weight, index = probs[b, :, e].topk(k)
            out[b, index] += weight[:, None] * (F.gelu(x[b, index] @ moe.w1[e]) @ moe.w2[e])
    return out


def test_experts_with_exact_gelu():
    torch.manual_seed(0)
    moe = randomize_(ExpertChoiceFeedForward(8, 4, 2.0, 12, bias=False, approximate="none"), std=0.3)
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _expert_choice_reference(moe, x), rtol=1e-5, atol=1e-6)
        moe.approximate = "tanh"  # the default differs measurably
        assert not torch.allclose(moe(x), _expert_choice_reference(moe, x), atol=1e-6)
    assert ExpertChoiceFeedForward(8, 4).approximate == "tanh"
    assert set(moe_routing_stats(torch.nn.Sequential(moe))) == {"token_coverage", "experts_per_token",
                                                                "max_experts_per_token"}  # fmt: skip
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none'"):
        ExpertChoiceFeedForward(8, 4, approximate="erf")


# ----- the block and the width rules ------------------------------------------------------------------------------
def test_block_normalises_the_cross_attention_input_and_gates_the_others():
    """x += gate_msa * attn1(modulate(norm1 x)); x += attn2(norm2 x, y); x += gate_mlp * ff(modulate(norm3 x))."""
    torch.manual_seed(0)
    block = randomize_(MicroDiTBlock(16, 4, 8, 12, 20, SwiGLUFeedForward(16, 32, bias=False)), std=0.2)
    x, text, cond = torch.randn(2, 6, 16), torch.randn(2, 3, 12), torch.randn(2, 20)
    shift1, scale1, gate1, shift2, scale2, gate2 = block.adaln_modulation(cond)[:, None].chunk(6, dim=-1)
    h = x + gate1 * block.attn1(_layer_norm(x, 1e-6, block.norm1.weight) * (1 + scale1) + shift1)
    h = h + block.attn2(_layer_norm(h, 1e-6, block.norm2.weight), text)
    h = h + gate2 * block.ff(_layer_norm(h, 1e-6, block.norm3.weight) * (1 + scale2) + shift2)
    context = BlockContext(encoder_hidden_states=text, condition=cond)
    torch.testing.assert_close(block(x, context), h, rtol=1e-5, atol=1e-5)
    assert block.attn1.heads == 2 and block.attn2.heads == 4  # the self-attention may be narrower


@pytest.mark.parametrize(
    "dim, ratio, head_dim, width",
    [(48, 0.5, 8, 32), (48, 0.6666666666666666, 8, 32), (48, 0.8333333333333333, 8, 48), (48, 1.0, 8, 48),
     (1024, 0.5, 64, 512), (1024, 0.5185185185185185, 64, 640)],
)  # fmt: skip
def test_attention_width_rounds_up_to_two_heads(dim, ratio, head_dim, width):
    assert attention_width(dim, ratio, head_dim) == width


def test_feed_forward_widths_follow_the_original():
    """cases.json microdit_xl_like derived widths (dim 48, multiple_of 16) and the mixer's (dim 32)."""
    ratios = [0.5, 1.6666666666666667, 2.8333333333333335, 4.0]
    assert [swiglu_hidden(48, r, 16) for r in ratios] == [16, 64, 96, 128]
    assert expert_hidden(48, ratios[1], 16) == 80 and expert_hidden(32, 4.0, 16) == 128
    assert swiglu_hidden(32, 4.0, 16) == 96 and swiglu_hidden(128, 4.0, 32) == 352
