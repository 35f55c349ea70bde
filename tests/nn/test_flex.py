"""The ``sdpa_flex`` backend (dit.nn.attention.flex): the block mask built from key blocks equals torch's
``create_block_mask``, the attention equals SDPA with PixArt's additive bias (forward and backward), and the
backbones run it exactly, with masked key blocks skipped and nothing read on the host."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from dit.nn.attention.backends import BACKENDS, AttentionBackend
from dit.nn.attention.flex import FLEX_BLOCK_SIZE, attended_keys, flex_block_mask, flex_mask, sdpa_flex_attention
from dit.nn.attention.ops import keep_mask_to_bias, sdpa_attention
from tests.tiny import FORWARD_VARIANTS, assert_fp32_close, randomize_, variant_inputs, variant_model

#: (queries, keys): non-square, key counts below, at and above the block size, not multiples of it.
SHAPES = [(256, 300), (100, 77), (384, 256), (130, 129)]


def _keep(batch_keys: int) -> torch.Tensor:
    """Four samples: trailing padding (T5), padding in the middle (a whole key block skipped), none, all masked."""
    keep = torch.zeros(4, batch_keys, dtype=torch.bool)  # (B, Lk)
    keep[0, :20] = True
    keep[1, :5], keep[1, -2:] = True, True
    keep[2] = True
    return keep


@pytest.mark.parametrize("q_len, k_len", SHAPES)
def test_block_mask_equals_create_block_mask(q_len, k_len):
    bias = keep_mask_to_bias(_keep(k_len), torch.float32)  # (B, 1, 1, Lk)
    ours = flex_block_mask(bias, q_len)
    keep = attended_keys(bias)
    reference = create_block_mask(lambda b, h, q, k: keep[b, k], 4, None, q_len, k_len, device="cpu")
    assert ours.BLOCK_SIZE == (FLEX_BLOCK_SIZE, FLEX_BLOCK_SIZE) == reference.BLOCK_SIZE
    assert ours.seq_lengths == (q_len, k_len)
    assert torch.equal(ours.to_dense(), reference.to_dense())  # the same key blocks are read
    # and the same run unmasked (torch also masks the last query block where queries end inside it: no need)
    complete = q_len // FLEX_BLOCK_SIZE
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name)[..., :complete], getattr(reference, name)[..., :complete]), name
    if k_len > 2 * FLEX_BLOCK_SIZE:  # the middle block of sample 1 is skipped: its keys are never loaded
        assert int(ours.kv_num_blocks[1, 0, 0] + ours.full_kv_num_blocks[1, 0, 0]) == 2


def test_a_sample_with_no_kept_key_reads_every_key():
    keep = torch.zeros(2, 40, dtype=torch.bool)
    keep[0, :3] = True
    assert attended_keys(keep_mask_to_bias(keep, torch.float32)).tolist() == [[True] * 3 + [False] * 37, [True] * 40]


@pytest.mark.parametrize("q_len, k_len", SHAPES[:2])
def test_attention_equals_sdpa_with_the_bias(q_len, k_len):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, n, 2, 16, generator=gen) for n in (q_len, k_len, k_len))  # (B, L, H, D)
    bias = keep_mask_to_bias(_keep(k_len), torch.float32)
    actual = sdpa_flex_attention(q, k, v, flex_mask(bias, 2, q_len))  # (B, Lq, H, D)
    # rows with some kept key agree to fp32 rounding; the all-masked sample's reference loses digits to its
    # -1e4 logits (fp32 spacing there is ~1e-3), so it is checked against float64
    assert_fp32_close(actual[:3], sdpa_attention(q, k, v, bias)[:3])
    exact = sdpa_attention(q.double(), k.double(), v.double(), bias.double())
    assert_fp32_close(actual[3].double(), exact[3])


def test_gradients_on_the_cpu_run_sdpa_with_the_bias():
    """FlexAttention has no CPU backward; the same attention through SDPA gives the gradients (GPU: flex's own,
    tests/gpu/test_flex.py)."""
    q, k, v = (torch.randn(2, n, 2, 8, requires_grad=True) for n in (24, 40, 40))
    keep = _keep(40)[:2]
    bias = keep_mask_to_bias(keep, torch.float32)
    actual = sdpa_flex_attention(q, k, v, flex_mask(bias, 2, 24))
    expected = sdpa_attention(q, k, v, bias)
    assert torch.equal(actual, expected)
    assert actual.grad_fn is not None


def test_without_a_mask_it_is_sdpa():
    q, k, v = torch.randn(3, 2, 10, 3, 8).unbind(0)
    assert torch.equal(sdpa_flex_attention(q, k, v), sdpa_attention(q, k, v))


def _long_text(variant: str, length: int = 300) -> dict:
    """The variant's inputs with ``length`` text tokens whose last one is kept: host trimming keeps them all, so
    the padded middle reaches attention (a skipped key block for the flex kernel)."""
    inputs = variant_inputs(variant, text_length=length)
    if "encoder_attention_mask" in inputs:
        inputs["encoder_attention_mask"][:, -1] = 1
    return inputs


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_backbones_run_it_exactly(variant, monkeypatch):
    calls = []

    def counted(q, k, v, mask=None):
        calls.append(mask is not None)
        return sdpa_flex_attention(q, k, v, mask)

    monkeypatch.setitem(BACKENDS, "sdpa_flex", AttentionBackend("sdpa_flex", counted, flex_mask))
    model, inputs = randomize_(variant_model(variant), std=0.1), _long_text(variant)
    with torch.no_grad():
        expected = model(**inputs)[0]
        model.set_attention_backend("sdpa_flex")
        actual = model(**inputs)[0]
    assert_fp32_close(actual, expected)
    backend = model.transformer_blocks[0].attn1.backend
    assert backend.name == "sdpa_flex"
    assert any(calls) or variant == "microdit-masked"  # MicroDiT reads no text mask (use_text_mask=False)


def test_no_host_read_inside_a_compiled_forward():
    model, inputs = variant_model("sigma-mask"), _long_text("sigma-mask")
    model.set_attention_backend("sdpa_flex")
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
