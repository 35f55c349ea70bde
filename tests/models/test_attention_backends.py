"""``set_attention_backend`` with diffusers' backend names: the softmax runs through diffusers' dispatcher, gives our
kernels' outputs where the backend runs on the CPU, and an unusable backend is an error naming it and saying why."""

from __future__ import annotations

import pytest
import torch

from dit.nn.attention import DiTAttention
from dit.nn.attention.backends import diffusers_backend_names
from tests.tiny import FORWARD_VARIANTS, assert_fp32_close, randomize_, variant_inputs, variant_model


def _sample(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("backend", ["native", "_native_math"])
@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_diffusers_cpu_backends_match_ours(variant, backend, monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    calls, name = [], AttentionBackendName(backend)
    kernel = _AttentionBackendRegistry._backends[name]
    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, lambda **k: calls.append(name) or kernel(**k))
    model, inputs = randomize_(variant_model(variant), std=0.1), variant_inputs(variant)
    expected = _sample(model, inputs)
    model.set_attention_backend("math")
    reference = _sample(model, inputs)
    model.set_attention_backend(backend)
    assert all(m.backend.name == backend for m in model.modules() if isinstance(m, DiTAttention))
    actual = _sample(model, inputs)
    assert calls  # through diffusers' dispatcher, to that backend's kernel
    assert_fp32_close(actual, expected)
    assert_fp32_close(actual, reference)


def test_unusable_backend_is_an_error_naming_it_and_why():
    model = variant_model("sigma-mask")
    with pytest.raises(RuntimeError, match=r"'flash' cannot be used here: .*flash-attn"):
        model.set_attention_backend("flash")
    assert model.transformer_blocks[0].attn1.backend.name == "sdpa"  # unchanged


def test_cuda_only_backend_on_the_cpu_names_the_backend():
    model, inputs = variant_model("sigma-mask"), variant_inputs("sigma-mask")
    model.set_attention_backend("_native_efficient")
    with pytest.raises(RuntimeError, match=r"'_native_efficient' failed on cpu torch.float32 inputs"):
        _sample(model, inputs)


def test_unknown_backend_lists_ours_and_diffusers():
    assert {"flash", "flex", "_native_cudnn", "sage", "native"} <= diffusers_backend_names()
    with pytest.raises(
        ValueError, match=r"'flashy'.*\['math', 'sdpa', 'sdpa_flex', 'xformers'\].*'_native_cudnn'.*'flex'"
    ):
        variant_model("sigma-mask").set_attention_backend("flashy")


def test_module_level_backend():
    attn = DiTAttention(16, 2, 8).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = attn(x)
        attn.set_attention_backend("_native_math")
        assert_fp32_close(attn(x), expected)
    with pytest.raises(ValueError, match="on the model"):
        attn.set_attention_backend("xformers")
