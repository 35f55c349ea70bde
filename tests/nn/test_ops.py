import pytest
import torch

from dit.nn.attention.ops import (
    MASKED_BIAS,
    keep_mask_to_bias,
    math_attention,
    sdpa_attention,
    xformers_bias,
)


def test_bias_is_per_sample_not_per_head():
    keep = torch.tensor([[True, False, True]])
    bias = keep_mask_to_bias(keep, torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    assert bias.flatten().tolist() == [0.0, MASKED_BIAS, 0.0]


@pytest.mark.parametrize("key_len", [300, 120, 7])
def test_xformers_bias_is_stride_aligned(key_len):
    keep = torch.rand(2, key_len) > 0.3
    bias = keep_mask_to_bias(keep, torch.float32)
    expanded = xformers_bias(bias, heads=3, q_len=5)
    assert expanded.shape == (2, 3, 5, key_len)
    assert expanded.stride(-2) % 8 == 0
    assert torch.equal(expanded, bias.expand(2, 3, 5, key_len))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("q_len, k_len", [(16, 16), (10, 7)])
def test_sdpa_matches_math_reference(masked, q_len, k_len):
    q, k, v = torch.randn(2, q_len, 3, 8), torch.randn(2, k_len, 3, 8), torch.randn(2, k_len, 3, 8)
    bias = keep_mask_to_bias(torch.rand(2, k_len) > 0.4, torch.float32) if masked else None
    torch.testing.assert_close(sdpa_attention(q, k, v, bias), math_attention(q, k, v, bias), atol=1e-5, rtol=1e-5)
