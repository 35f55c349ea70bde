"""Linear attention (LiT) and KV compression (PixArt-Σ) as options of the one attention module."""

import math

import pytest
import torch
import torch.nn.functional as F

from dit.nn.attention import AttentionSpec, DiTAttention
from dit.nn.attention.kv_compress import KVCompress
from dit.nn.attention.ops import linear_attention_reference, math_attention, relu_linear_attention


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("lq,lk", [(12, 12), (7, 20)], ids=["self", "rect"])
def test_linear_kernel_matches_naive_quadratic_reference(masked, lq, lk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, lq, 3, 8), torch.randn(2, lk, 3, 8), torch.randn(2, lk, 3, 8)
    keep = None
    if masked:
        keep = torch.ones(2, lk, dtype=torch.bool)
        keep[1, lk // 2 :] = False
    out = relu_linear_attention(q, k, v, keep)
    assert out.shape == (2, lq, 3, 8)
    assert (out - linear_attention_reference(q, k, v, keep)).abs().max() <= 1e-5
    if masked:  # masked keys have no influence at all
        v2 = v.clone()
        v2[1, lk // 2 :] = 1e3
        assert torch.allclose(relu_linear_attention(q, k, v2, keep), out, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_kernel_is_stable_in_half_precision(dtype):
    """Magnitudes whose products overflow fp16 (q.k ~ 1e6, sums over 4096 keys) still give finite, exact outputs."""
    torch.manual_seed(0)
    q, k = torch.rand(1, 4096, 2, 16) * 300, torch.rand(1, 4096, 2, 16) * 300
    v = (torch.rand(1, 4096, 2, 16) - 0.5) * 6e4  # values near the fp16 limit
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = relu_linear_attention(q, k, v)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert out.float().abs().max() <= v.float().abs().max()  # a convex combination of value rows
    reference = linear_attention_reference(q, k, v).float()
    assert ((out.float() - reference).abs() / reference.abs().clamp(min=1.0)).max() < 1e-2


def test_linear_attention_matches_diffusers_sana_processor():
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    torch.manual_seed(0)
    theirs = Attention(32, heads=2, dim_head=16, bias=True, out_bias=True, processor=SanaLinearAttnProcessor2_0())
    ours = DiTAttention(32, heads=2, dim_head=16, spec=AttentionSpec(kernel="linear"))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("grid", [(8, 8), (7, 9), (5, 3), (1, 1)], ids=["even", "odd", "small", "one"])
@pytest.mark.parametrize("mode", ["conv", "avg", "uniform"])
def test_kv_compress_any_grid(mode, grid):
    torch.manual_seed(0)
    h, w = grid
    x = torch.randn(2, h * w, 16)
    out = KVCompress(16, 2, mode)(x, grid)
    assert out.shape == (2, math.ceil(h / 2) * math.ceil(w / 2), 16) and torch.isfinite(out).all()


def test_kv_compress_conv_starts_as_average_pooling_then_layernorm():
    torch.manual_seed(0)
    module = KVCompress(16, 2, "conv")
    x = torch.randn(2, 6 * 4, 16)
    pooled = F.avg_pool2d(x.transpose(1, 2).unflatten(-1, (6, 4)), 2).flatten(2).transpose(1, 2)  # (B, 6, C)
    assert torch.allclose(module(x, (6, 4)), F.layer_norm(pooled, (16,)), atol=1e-5)
    avg = KVCompress(16, 2, "avg")(x, (6, 4))
    assert torch.allclose(avg, pooled, atol=1e-6)
    odd = KVCompress(16, 2, "avg")(torch.ones(1, 15, 16), (5, 3))
    assert torch.allclose(odd, torch.ones_like(odd))  # partial windows average what they have


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)], ids=["even", "odd"])
def test_kv_compressed_attention_is_softmax_over_pooled_keys(grid):
    torch.manual_seed(0)
    attn = DiTAttention(
        16, heads=2, dim_head=8, spec=AttentionSpec(kv_compress_ratio=2, kv_compress_mode="avg")
    ).eval()
    x = torch.randn(2, grid[0] * grid[1], 16)
    pool = KVCompress(16, 2, "avg")
    q = attn.to_q(x).unflatten(-1, (2, 8))
    k = pool(attn.to_k(x), grid).unflatten(-1, (2, 8))
    v = pool(attn.to_v(x), grid).unflatten(-1, (2, 8))
    expected = attn.to_out[0](math_attention(q, k, v).flatten(-2))
    with torch.no_grad():
        assert (attn(x, grid=grid) - expected).abs().max() <= 1e-5


def test_grid_options_need_a_grid_and_reject_pooled_masks():
    attn = DiTAttention(16, heads=2, dim_head=8, spec=AttentionSpec(kv_compress_ratio=2))
    x = torch.randn(1, 16, 16)
    with pytest.raises(ValueError, match="grid"):
        attn(x)
    with pytest.raises(ValueError, match="mask"):
        attn(x, mask=torch.zeros(1, 1, 1, 16), grid=(4, 4))
    with pytest.raises(ValueError, match="kv_compress_mode"):
        KVCompress(16, 2, "nearest")
    with pytest.raises(ValueError, match="kernel"):
        DiTAttention(16, 2, 8, spec=AttentionSpec(kernel="cosine"))


def test_value_convolution_starts_at_zero_and_sees_neighbours_only_on_the_grid():
    torch.manual_seed(0)
    attn = DiTAttention(16, heads=1, dim_head=16, spec=AttentionSpec(kernel="linear", conv_kernel_size=5))
    x = torch.randn(1, 12, 16)
    plain = DiTAttention(16, heads=1, dim_head=16, spec=AttentionSpec(kernel="linear"))
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if "dwc" not in k})
    with torch.no_grad():
        assert torch.allclose(attn(x, grid=(3, 4)), plain(x), atol=1e-6)  # zero-initialised
        attn.dwc.weight.normal_()
        assert not torch.allclose(attn(x, grid=(3, 4)), plain(x), atol=1e-3)


def test_no_padding_drops_the_remainder_as_the_original_conv():
    """``kv_compress_padding="none"``: Conv2d(kernel=stride=r) without padding, floor(h/r) x floor(w/r) cells."""
    torch.manual_seed(0)
    module = KVCompress(16, 2, "conv", padding="none")
    torch.nn.init.normal_(module.conv.weight)
    x = torch.randn(2, 3 * 5, 16)
    grid = x.transpose(1, 2).unflatten(-1, (3, 5))  # (B, C, 3, 5)
    expected = module.norm(module.conv(grid).flatten(2).transpose(1, 2))  # (B, 1*2, C)
    assert module(x, (3, 5)).shape == (2, 2, 16)
    assert torch.allclose(module(x, (3, 5)), expected, atol=1e-6)
    assert KVCompress(16, 2, "conv")(x, (3, 5)).shape == (2, 6, 16)  # the default replicate-pads: 2x3 cells


@pytest.mark.parametrize("padding", ["none", "replicate"])
def test_ave_is_nearest_subsampling(padding):
    """PixArt-Σ's ``ave`` is F.interpolate(mode="nearest"): the top-left token of each cell, no averaging."""
    x = torch.randn(2, 13 * 19, 16)
    grid = x.transpose(1, 2).unflatten(-1, (13, 19))  # (B, C, 13, 19)
    ave = KVCompress(16, 2, "ave", padding=padding)(x, (13, 19))
    if padding == "none":
        expected = F.interpolate(grid, scale_factor=0.5, mode="nearest").flatten(2).transpose(1, 2)  # (B, 6*9, C)
    else:
        expected = grid[..., ::2, ::2].flatten(2).transpose(1, 2)  # (B, 7*10, C)
    assert torch.equal(ave, expected)


def test_uniform_without_padding_matches_ave():
    x = torch.randn(1, 15 * 15, 8)
    a, b = (KVCompress(8, 3, mode, padding="none")(x, (15, 15)) for mode in ("uniform", "ave"))
    assert a.shape == (1, 25, 8) and torch.equal(a, b)


def test_qk_norm_across_heads_is_pixart_sigmas_layer_norm():
    """``qk_norm="layer_norm_across_heads"``: affine LayerNorm(width, eps 1e-5) on q and k before compression."""
    torch.manual_seed(0)
    attn = DiTAttention(16, 2, 8, spec=AttentionSpec(qk_norm="layer_norm_across_heads", kv_compress_ratio=2)).eval()
    assert attn.norm_q.weight.shape == (16,) and attn.norm_q.eps == 1e-5
    for norm in (attn.norm_q, attn.norm_k):
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 16)
    q, k, v = attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(x)), attn.to_v(x)
    k, v = attn.kv_compress(k, (4, 4)), attn.kv_compress(v, (4, 4))  # (B, 4, C)
    split = lambda t: t.unflatten(-1, (2, 8)).transpose(1, 2)  # noqa: E731 (B, H, L, D)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
    with torch.no_grad():
        assert torch.allclose(attn(x, grid=(4, 4)), attn.to_out[0](out), atol=1e-5)
    with pytest.raises(ValueError, match="qk_norm"):
        DiTAttention(16, 2, 8, spec=AttentionSpec(qk_norm="rms"))
