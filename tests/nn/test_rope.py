"""2D RoPE and its training-free extrapolation: formulas against hand-computed values, rotation properties, and the
qk_norm / rotary options of DiTAttention."""

import math

import pytest
import torch

from dit.nn.attention import AttentionSpec, DiTAttention
from dit.nn.attention.rope import (
    EXTRAPOLATIONS,
    RotaryEmbedding,
    apply_rotary,
    attention_logit_scale,
    axis_frequencies,
    extrapolated_frequencies,
    fit_proportion,
    ntk_theta,
    rotary_embedding,
    rotary_tables,
    yarn_correction_dim,
    yarn_mscale,
    yarn_ramp,
)

THETA = 10000.0
#: FiT's ntk-aware-pro methods scale the logits inside the training grid too (as FiT's code); the others do not.
PRO = [name for name in sorted(EXTRAPOLATIONS) if "_pro" in name]


def _sizes(*hw):
    return torch.tensor(hw, dtype=torch.long)


# ----- formulas --------------------------------------------------------------------------------------------
def test_axis_frequencies_by_hand():
    expected = [1.0, 10000 ** (-2 / 8), 10000 ** (-4 / 8), 10000 ** (-6 / 8)]  # 1 / theta^(2i / dim), dim = 8
    assert axis_frequencies(8).tolist() == pytest.approx(expected, rel=1e-12)


def test_ntk_base_by_hand():
    # FiT-XL: one axis has 36 channels; s = 2 gives b' = 10000 * 2^(36/34)
    assert ntk_theta(THETA, torch.tensor([2.0]), 36).item() == pytest.approx(10000 * 2 ** (36 / 34), rel=1e-12)
    assert ntk_theta(THETA, torch.tensor([1.0]), 36).item() == pytest.approx(10000.0)


def test_pi_divides_frequencies():
    # head_dim 16 -> 8 channels per axis; grid 8x8 against a 4x4 training grid -> s = 2
    freqs_h, freqs_w, mscale = extrapolated_frequencies(_sizes([8, 8]), 16, (4, 4), "pi")
    expected = [1 / 2, 10000 ** (-2 / 8) / 2, 10000 ** (-4 / 8) / 2, 10000 ** (-6 / 8) / 2]
    assert freqs_h[0].tolist() == pytest.approx(expected, rel=1e-12)
    assert freqs_w[0].tolist() == pytest.approx(expected, rel=1e-12)
    assert mscale is None


def test_ntk_frequencies_use_the_new_base():
    freqs_h, _, _ = extrapolated_frequencies(_sizes([8, 4]), 16, (4, 4), "ntk")
    base = 10000 * 2 ** (8 / 6)  # dim 8, s = 2
    assert freqs_h[0].tolist() == pytest.approx([base ** (-i / 8) for i in (0, 2, 4, 6)], rel=1e-12)


def test_yarn_ramp_endpoints_fit_xl():
    # dim 36, L_train 16: corr(32) = 36 ln(16 / (64 pi)) / (2 ln 1e4) = -4.95 -> low 0; corr(1) = 1.83 -> high 2
    assert yarn_correction_dim(32, 36, THETA, 16) == pytest.approx(-4.946, abs=1e-3)
    assert yarn_correction_dim(1, 36, THETA, 16) == pytest.approx(1.827, abs=1e-3)
    ramp = yarn_ramp(36, THETA, 16)
    assert ramp.shape == (18,)
    assert ramp[:3].tolist() == [1.0, 0.5, 0.0]
    assert (ramp[2:] == 0).all()


def test_yarn_ramp_long_training_length():
    # L_train 256: corr(32) = 0.47 -> low 0; corr(1) = 7.24 -> high 8; g_i = 1 - i / 8 between
    ramp = yarn_ramp(36, THETA, 256)
    assert ramp[:9].tolist() == pytest.approx([1 - i / 8 for i in range(9)])
    assert (ramp[8:] == 0).all()


def test_yarn_frequencies_and_temperature():
    # dim 8 per axis, L_train 4: corr(32) = -1.70 -> low 0; corr(1) = 8 ln(4 / 2pi) / (2 ln 1e4) = -0.20 -> high 0,
    # moved to 0.001: g = [1, 0, 0, 0], so the first frequency is kept and the others divided by s = 2
    assert yarn_ramp(8, THETA, 4).tolist() == [1.0, 0.0, 0.0, 0.0]
    freqs_h, _, mscale = extrapolated_frequencies(_sizes([8, 8]), 16, (4, 4), "yarn")
    base = axis_frequencies(8)
    expected = base / 2
    expected[0] = base[0]
    assert freqs_h[0].tolist() == pytest.approx(expected.tolist(), rel=1e-12)
    assert mscale.tolist() == pytest.approx([0.1 * math.log(2) + 1])
    assert yarn_mscale(torch.tensor([0.5, 1.0, 4.0])).tolist() == pytest.approx([1.0, 1.0, 0.1 * math.log(4) + 1])


def test_vision_pi_divides_each_axis_by_its_own_scale():
    # FiT's decoupled PI at 10x14 against 8x8: s_h = 1.25, s_w = 1.75 (fixtures' fitv2_pi: freqs_h[0] = 0.8)
    freqs_h, freqs_w, mscale = extrapolated_frequencies(_sizes([10, 14]), 16, (8, 8), "vision_pi")
    base = axis_frequencies(8)
    torch.testing.assert_close(freqs_h[0], base / 1.25)
    torch.testing.assert_close(freqs_w[0], base / 1.75)
    assert mscale is None


def test_ntk_by_parts_by_hand():
    """dim 16 per axis, L_train 64, s = 2. corr(r) = 16 ln(64 / (2 pi r)) / (2 ln 1e4): corr(1.25) = 1.82 -> low 1,
    corr(0.75) = 2.27 -> high 3, so g1 = [1, 1, 0.5, 0, ...] (1: NTK, 0: PI); corr(16) = -0.39 -> low 0, corr(2) =
    1.41 -> high 2, so g2 = [1, 0.5, 0, ...] (1: kept). Frequency 0 is kept, 1 is half NTK half kept, 2 is half PI
    half NTK, the rest PI."""
    assert yarn_correction_dim(1.25, 16, THETA, 64) == pytest.approx(1.822, abs=1e-3)
    assert yarn_correction_dim(0.75, 16, THETA, 64) == pytest.approx(2.266, abs=1e-3)
    assert yarn_correction_dim(2, 16, THETA, 64) == pytest.approx(1.414, abs=1e-3)
    freqs_h, freqs_w, mscale = extrapolated_frequencies(_sizes([128, 64]), 32, (64, 64), "vision_ntk_by_parts")
    base = axis_frequencies(16)
    pi, ntk = base / 2, 1 / (10000 * 2 ** (16 / 14)) ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    expected = pi.clone()
    expected[0] = base[0]
    expected[1] = 0.5 * ntk[1] + 0.5 * base[1]
    expected[2] = 0.5 * pi[2] + 0.5 * ntk[2]
    torch.testing.assert_close(freqs_h[0], expected)
    torch.testing.assert_close(freqs_w[0], base)  # the width fits: s_w = 1
    assert mscale is None
    shared_h, shared_w, _ = extrapolated_frequencies(_sizes([128, 64]), 32, (64, 64), "ntk_by_parts")
    torch.testing.assert_close(shared_w, shared_h)


@pytest.mark.parametrize("method", ["pi", "ntk", "ntk_by_parts", "yarn", "ntk_pro1"])
def test_vision_variants_scale_height_and_width_separately(method):
    sizes = _sizes([8, 4], [4, 12])  # s = (2, 1) and (1, 3) against a 4x4 grid
    plain_h, plain_w, _ = extrapolated_frequencies(sizes, 16, (4, 4), method)
    vision_h, vision_w, _ = extrapolated_frequencies(sizes, 16, (4, 4), f"vision_{method}")
    untouched = axis_frequencies(8)
    torch.testing.assert_close(vision_w[0], untouched)  # width fits: unchanged in the vision variant
    torch.testing.assert_close(vision_h[1], untouched)  # height fits
    torch.testing.assert_close(plain_w[0], plain_h[0])  # plain: one scale, the larger, for both axes
    torch.testing.assert_close(vision_h[0], plain_h[0])  # s_h = 2 both ways
    torch.testing.assert_close(vision_w[1], plain_w[1])  # s_w = 3 both ways
    assert not torch.allclose(plain_w[0], untouched)


@pytest.mark.parametrize("method", sorted(EXTRAPOLATIONS))
def test_every_method_is_plain_rope_inside_the_training_grid(method):
    sizes = _sizes([4, 4], [2, 3], [1, 4])
    freqs_h, freqs_w, mscale = extrapolated_frequencies(sizes, 16, (4, 4), method)
    torch.testing.assert_close(freqs_h, axis_frequencies(8).expand(3, -1))
    torch.testing.assert_close(freqs_w, axis_frequencies(8).expand(3, -1))
    if method not in PRO:
        assert mscale is None or (mscale == 1).all()


def test_fit_proportion_by_hand():
    # fixtures' fitv2_ntkpro2: 10x10 against 8x8 -> sqrt(log 200 / log 64) = 1.1287055 (cases.json)
    assert fit_proportion(torch.tensor([100]), 64).item() == pytest.approx(1.1287055, rel=1e-6)
    # 2 L <= L_train: 1; the factor 2 makes 8x8 (64 tokens) against 64 already sqrt(log 128 / log 64)
    assert fit_proportion(torch.tensor([32, 64]), 64).tolist() == pytest.approx([1.0, math.sqrt(7 / 6)])
    with pytest.raises(ValueError, match="training length >= 2"):
        fit_proportion(torch.tensor([4]), 1)


@pytest.mark.parametrize("method", PRO)
def test_pro_temperatures_by_hand(method):
    """pro1: the longer side against the training side; pro2: tokens against training tokens; both axes count,
    decoupled or not. Frequencies: NTK-aware (decoupled in ``vision_*``)."""
    sizes = _sizes([10, 6], [3, 4], [8, 8])  # against 8x8
    freqs_h, _, mscale = extrapolated_frequencies(sizes, 16, (8, 8), method)
    ntk_h, _, _ = extrapolated_frequencies(sizes, 16, (8, 8), method.replace("_pro1", "").replace("_pro2", ""))
    torch.testing.assert_close(freqs_h, ntk_h)
    if "pro1" in method:  # L = 10, 4, 8 against 8: 2 L = 20, 8 (<= 8: 1), 16
        expected = [math.sqrt(math.log(20) / math.log(8)), 1.0, math.sqrt(math.log(16) / math.log(8))]
    else:  # L = 60, 12, 64 against 64: 2 L = 120, 24 (<= 64: 1), 128
        expected = [math.sqrt(math.log(120) / math.log(64)), 1.0, math.sqrt(math.log(128) / math.log(64))]
    assert mscale.tolist() == pytest.approx(expected, rel=1e-12)
    rotary = rotary_embedding(torch.zeros(3, 1, 2), sizes, 16, (8, 8), method, logit_scale=True)
    logit = [m**2 * max(1.0, math.log(h * w) / math.log(64)) for m, (h, w) in zip(expected, sizes.tolist())]
    assert rotary.logit_scale.flatten().tolist() == pytest.approx(logit, rel=1e-6)


def test_attention_logit_scale_by_hand():
    # 32x32 tokens against 16x16: log(1024) / log(256) = 10 / 8
    scale = attention_logit_scale(torch.tensor([1024, 256, 64]), 256)
    assert scale.tolist() == pytest.approx([1.25, 1.0, 1.0])


def test_rotary_embedding_logit_scale_combines_yarn_temperature():
    positions = torch.zeros(1, 1, 2)
    only_scale = rotary_embedding(positions, _sizes([8, 8]), 16, (4, 4), "none", logit_scale=True)
    assert only_scale.logit_scale.flatten().tolist() == pytest.approx([math.log(64) / math.log(16)])
    yarn = rotary_embedding(positions, _sizes([8, 8]), 16, (4, 4), "yarn", logit_scale=True)
    mscale = 0.1 * math.log(2) + 1
    assert yarn.logit_scale.flatten().tolist() == pytest.approx([mscale**2 * math.log(64) / math.log(16)])
    assert rotary_embedding(positions, _sizes([8, 8]), 16, (4, 4), "ntk").logit_scale is None


def test_unknown_method_and_odd_head_width_are_named():
    with pytest.raises(ValueError, match="vision_ntk"):
        extrapolated_frequencies(_sizes([4, 4]), 16, (4, 4), "dynamic")
    with pytest.raises(ValueError, match="divisible by 4, got 18"):
        extrapolated_frequencies(_sizes([4, 4]), 18, (4, 4))


# ----- rotation ----------------------------------------------------------------------------------------------
def _tables(positions, method="none", sizes=((4, 4),)):
    freqs_h, freqs_w, _ = extrapolated_frequencies(torch.tensor(sizes), 16, (4, 4), method)
    return rotary_tables(positions, freqs_h, freqs_w)


def test_matches_complex_number_reference():
    """Pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1], turned by e^{i angle}; h-part then w-part."""
    positions = torch.tensor([[[1, 2], [3, 0], [2, 3]]])  # (1, 3, 2)
    x = torch.randn(1, 3, 2, 16, dtype=torch.float64)
    cos, sin = _tables(positions)
    ours = apply_rotary(x, cos.double(), sin.double())
    freqs = axis_frequencies(8)  # (4,)
    angles = torch.cat([positions[..., :1] * freqs, positions[..., 1:] * freqs], dim=-1)  # (1, 3, 8)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())  # (1, 3, 2, 8)
    turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, :, None]
    torch.testing.assert_close(ours, torch.view_as_real(turned).flatten(-2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", sorted(EXTRAPOLATIONS))
def test_rotation_preserves_norms(method):
    positions = torch.randint(0, 12, (2, 10, 2))
    x = torch.randn(2, 10, 3, 16)
    cos, sin = _tables(positions, method, sizes=((12, 4), (8, 12)))
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["none", "vision_ntk", "vision_yarn"])
def test_score_depends_only_on_the_offset(method):
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    offset = torch.tensor([2, -3])
    starts = torch.tensor([[0, 5], [3, 7], [9, 3]])
    positions = torch.stack([starts, starts + offset], dim=1).reshape(1, -1, 2)  # (1, 6, 2): q, k, q, k, ...
    cos, sin = _tables(positions, method, sizes=((12, 8),))
    q_rot = apply_rotary(q.expand(1, 6, 1, 16), cos.double(), sin.double())[0, 0::2, 0]  # (3, 16)
    k_rot = apply_rotary(k.expand(1, 6, 1, 16), cos.double(), sin.double())[0, 1::2, 0]  # (3, 16)
    scores = (q_rot * k_rot).sum(-1)  # (3,)
    torch.testing.assert_close(scores, scores[:1].expand(3), atol=1e-6, rtol=1e-6)  # fp32 tables
    moved = apply_rotary(k.expand(1, 6, 1, 16), cos.double(), sin.double())[0, 2, 0]  # k at another offset
    assert not torch.isclose((q_rot[0] * moved).sum(), scores[0])


# ----- DiTAttention options ----------------------------------------------------------------------------------
def _rotary(batch, tokens, head_dim=8, logit_scale=None):
    positions = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(tokens // 2), indexing="ij"), -1)
    positions = positions.reshape(1, tokens, 2).expand(batch, -1, -1)  # (B, N, 2)
    freqs_h, freqs_w, _ = extrapolated_frequencies(torch.tensor([[2, tokens // 2]] * batch), head_dim, (2, 4))
    cos, sin = rotary_tables(positions, freqs_h, freqs_w)
    return RotaryEmbedding(cos, sin, logit_scale)


def test_qk_norm_adds_no_state_dict_keys():
    plain, normed = DiTAttention(16, 2, 8), DiTAttention(16, 2, 8, spec=AttentionSpec(qk_norm=True))
    assert list(plain.state_dict()) == list(normed.state_dict())
    normed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 16)
    assert not torch.allclose(plain(x), normed(x))


def test_qk_norm_then_rotary_then_scale_matches_reference():
    torch.manual_seed(0)
    attn = DiTAttention(16, 2, 8, spec=AttentionSpec(qk_norm=True)).eval()
    x = torch.randn(2, 8, 16)
    scale = torch.tensor([1.0, 1.7]).view(2, 1, 1, 1)
    rotary = _rotary(2, 8, logit_scale=scale)
    q, k, v = (m(x).unflatten(-1, (2, 8)) for m in (attn.to_q, attn.to_k, attn.to_v))  # (B, N, H, D)
    q, k = (torch.nn.functional.layer_norm(t, (8,), eps=1e-6) for t in (q, k))
    q, k = apply_rotary(q, rotary.cos, rotary.sin), apply_rotary(k, rotary.cos, rotary.sin)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8) * scale  # (B, H, N, N)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).flatten(-2)
    torch.testing.assert_close(attn(x, rotary=rotary), attn.to_out[0](out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_identity_rotary_is_no_rotary(masked):
    attn = DiTAttention(16, 2, 8).eval()
    x = torch.randn(2, 8, 16)
    mask = None
    if masked:
        from dit.nn.attention import AttentionMask, get_backend

        keep = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
        mask = AttentionMask.from_keep(keep, torch.float32, get_backend("sdpa"), 2, 8)
    identity = RotaryEmbedding(torch.ones(2, 8, 1, 8), torch.zeros(2, 8, 1, 8))
    torch.testing.assert_close(attn(x, mask=mask, rotary=identity), attn(x, mask=mask))
    assert not torch.allclose(attn(x, mask=mask, rotary=_rotary(2, 8)), attn(x, mask=mask))


def test_rotary_on_math_backend_matches_sdpa():
    from dit.nn.attention import get_backend

    attn = DiTAttention(16, 2, 8, spec=AttentionSpec(qk_norm=True)).eval()
    x, rotary = torch.randn(2, 8, 16), _rotary(2, 8, logit_scale=torch.full((2, 1, 1, 1), 1.3))
    sdpa = attn(x, rotary=rotary)
    attn.backend = get_backend("math")
    torch.testing.assert_close(attn(x, rotary=rotary), sdpa, atol=1e-5, rtol=1e-5)


def test_rotary_is_a_self_attention_option():
    attn = DiTAttention(16, 2, 8, cross_attention_dim=12)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(torch.randn(1, 8, 16), torch.randn(1, 3, 12), rotary=_rotary(1, 8))
