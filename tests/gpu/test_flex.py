"""The ``sdpa_flex`` backend on CUDA: FlexAttention's forward and backward against SDPA with the bias, and a backbone
forward with a 300-token device mask (diffusers' pipelines) that never synchronises."""

import pytest
import torch

from dit.nn.attention.flex import flex_mask, sdpa_flex_attention
from dit.nn.attention.ops import keep_mask_to_bias, sdpa_attention
from tests.tiny import FORWARD_VARIANTS, variant_inputs, variant_model


def _keep(batch: int, keys: int) -> torch.Tensor:
    keep = torch.zeros(batch, keys, dtype=torch.bool, device="cuda")  # (B, Lk)
    keep[0, :20] = True
    keep[1, :5], keep[1, -2:] = True, True
    return keep


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_forward_and_backward_equal_sdpa(dtype, tolerance):
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 64, generator=gen, device="cuda", dtype=dtype) for n in (1024, 300, 300))
    for t in (q, k, v):
        t.requires_grad_(True)
    bias = keep_mask_to_bias(_keep(2, 300), dtype)  # (B, 1, 1, Lk)
    actual = sdpa_flex_attention(q, k, v, flex_mask(bias, 4, 1024))  # (B, Lq, H, D)
    expected = sdpa_attention(q, k, v, bias)
    assert (actual - expected).abs().max().item() <= tolerance
    grads = torch.autograd.grad(actual.float().square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        assert (got - want).abs().max().item() <= tolerance * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_device_mask_forward_is_exact_and_never_synchronises(variant):
    model = variant_model(variant).cuda()
    inputs = variant_inputs(variant, "cuda", text_length=300)  # the mask on the device: nothing is trimmed
    with torch.no_grad():
        expected = model(**inputs).sample
        model.set_attention_backend("sdpa_flex")
        model(**inputs)  # compiles the kernel for these shapes
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            actual = model(**inputs).sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= 1e-4 * scale


def test_whole_model_compile_equals_eager():
    model, inputs = variant_model("sigma-mask").cuda(), variant_inputs("sigma-mask", "cuda", text_length=300)
    model.set_attention_backend("sdpa_flex")
    with torch.no_grad():
        expected = model(**inputs).sample
        actual = torch.compile(model, fullgraph=True, dynamic=False)(**inputs).sample
    assert (actual - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("selective", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(selective):
    """The recompute of a checkpointed block runs with dynamo disabled: FlexAttention's eager path there."""
    inputs = variant_inputs("sigma-mask", "cuda", text_length=300)
    grads = []
    for checkpointing in (False, True):
        model = variant_model("sigma-mask").cuda().train()
        model.set_attention_backend("sdpa_flex")
        if checkpointing:
            model.enable_gradient_checkpointing(selective=selective)
        model(**inputs).sample.square().mean().backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    for got, want in zip(*grads):
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
