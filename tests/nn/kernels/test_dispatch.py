"""When the Triton kernels serve a model, and that a model gives the same numbers with them as through the torch ops.

On the CPU the kernels run through triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py), forced on
with ``set_kernels("1")``; by default (``auto``) they serve CUDA tensors only, so the CPU path stays the torch ops.
"""

from __future__ import annotations

import pytest
import torch

from dit import LiTTransformer, PixArtTransformer
from dit.nn import kernels
from dit.nn.kernels import set_kernels, use_kernels
from tests.tiny import KERNEL_DEVICE, SIGMA, assert_fp32_close, needs_triton, randomize_

pytestmark = needs_triton

#: (model class, extra config): LiT (linear attention + value conv) and Σ with KV compression in every mode
MODELS = {
    "lit": (LiTTransformer, {}),
    "sigma-kv-conv": (PixArtTransformer, {"kv_compress_ratio": 2, "kv_compress_layers": [0, 1]}),
    "sigma-kv-avg-odd": (
        PixArtTransformer,
        {"kv_compress_ratio": 2, "kv_compress_layers": [0, 1], "kv_compress_mode": "avg"},
    ),
}
LATENTS = {"square": (8, 8), "wide": (6, 10)}


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    set_kernels(None)


def _inputs(latent: tuple[int, int], device: str, masked: bool) -> dict:
    gen = torch.Generator().manual_seed(3)
    mask = torch.zeros(2, 6, dtype=torch.long)
    mask[0, :2], mask[1, :5] = 1, 1
    inputs = {
        "hidden_states": torch.randn(2, 4, *latent, generator=gen),
        "encoder_hidden_states": torch.randn(2, 6, 32, generator=gen),
        "timestep": torch.tensor([10.0, 700.0]),
        "encoder_attention_mask": mask,
    }
    if masked:  # image-token padding: the second sample's last 5 tokens
        tokens = latent[0] * latent[1] // 4
        keep = torch.ones(2, tokens, dtype=torch.long)
        keep[1, -5:] = 0
        inputs["attention_mask"] = keep
    return {k: v.to(device) for k, v in inputs.items()}


def _forward_and_grads(model, inputs: dict, mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    set_kernels(mode)
    out = model(**inputs, return_dict=False)[0]  # (B, 8, h, w)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out.device)
    grads = torch.autograd.grad((out * weights).sum(), [p for p in model.parameters() if p.requires_grad])
    return out.detach(), list(grads)


def check_model_matches_the_torch_ops(device: str, name: str, latent: str, masked: bool) -> None:
    """Forward and every parameter's gradient, fp32, with the kernels and through the torch ops."""
    cls, extra = MODELS[name]
    torch.manual_seed(0)
    model = randomize_(cls(**SIGMA, **extra)).to(device)
    inputs = _inputs(LATENTS[latent], device, masked)
    expected, expected_grads = _forward_and_grads(model, inputs, "0")
    actual, grads = _forward_and_grads(model, inputs, "1")
    assert_fp32_close(actual, expected)
    for g, e in zip(grads, expected_grads):
        assert_fp32_close(g, e)


@pytest.mark.parametrize("latent", list(LATENTS))
@pytest.mark.parametrize(
    "name,masked", [("lit", False), ("lit", True), ("sigma-kv-conv", False), ("sigma-kv-avg-odd", False)]
)
def test_model_matches_the_torch_ops(name, latent, masked):
    check_model_matches_the_torch_ops(KERNEL_DEVICE, name, latent, masked)


def test_the_kernels_serve_cuda_tensors_by_default_and_obey_the_mode(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("DIT_TRITON", raising=False)
    assert not use_kernels(cpu)  # auto: CUDA only, so the CPU path is the torch ops
    set_kernels("1")
    assert use_kernels(cpu) == kernels.interpreting()
    set_kernels("0")
    assert not use_kernels(cpu)
    set_kernels(None)
    monkeypatch.setenv("DIT_TRITON", "1")
    assert use_kernels(cpu) == kernels.interpreting()
    monkeypatch.setenv("DIT_TRITON", "yes")
    with pytest.raises(ValueError, match="DIT_TRITON"):
        use_kernels(cpu)
    with pytest.raises(ValueError, match="Triton kernel mode"):
        set_kernels("on")


@pytest.mark.parametrize(
    "on_cuda,recording,batch_tokens,serves",
    [(True, False, 16384, True), (True, False, 4 * 4096, True), (True, False, 8192, False),
     (True, True, 65536, False), (False, False, 65536, False)],
)  # fmt: skip
def test_auto_serves_large_inference_calls_on_cuda(on_cuda, recording, batch_tokens, serves):
    # the measured H200 break-even (AUTO_MIN_TOKENS) and the slower training step: see dit.nn.kernels
    assert kernels.auto_serves(on_cuda, recording, batch_tokens) is serves


def test_compiled_code_uses_the_torch_ops():
    set_kernels("1")
    seen = []

    def probe(x):
        seen.append(use_kernels(x))
        return x + 1

    torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(2))
    assert seen == [False]
