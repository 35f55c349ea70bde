"""``cross_attention_kwargs={"scale": s}`` scales the loaded PEFT LoRA layers for one forward, as diffusers' PEFT
models do (``apply_lora_scale``), on every backbone; other keys are ignored with diffusers' warning."""

from __future__ import annotations

import peft
import pytest
import torch

from dit.models import mixins
from tests.tiny import FORWARD_VARIANTS, assert_fp32_close, randomize_, variant_inputs, variant_model


def _lora_model(variant: str) -> torch.nn.Module:
    model = randomize_(variant_model(variant), std=0.1)
    torch.manual_seed(1)
    model.add_adapter(
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    return model


def _sample(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs)[0]


def _scalings(model) -> list[float]:
    return [s for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer) for s in m.scaling.values()]


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_lora_scale_scales_the_adapters_for_one_call(variant):
    model, inputs = _lora_model(variant), variant_inputs(variant)
    scalings = _scalings(model)
    default = _sample(model, inputs)
    model.disable_adapters()
    base = _sample(model, inputs)
    model.enable_adapters()

    zero = _sample(model, inputs, cross_attention_kwargs={"scale": 0.0})
    half = _sample(model, inputs, cross_attention_kwargs={"scale": 0.5})
    one = _sample(model, inputs, cross_attention_kwargs={"scale": 1.0})
    assert_fp32_close(zero, base)
    assert torch.equal(one, default)
    lora_effect = (default - base).norm()
    assert lora_effect > 1e-3
    assert 0 < (half - base).norm() < lora_effect and 0 < (half - default).norm() < lora_effect
    assert _scalings(model) == scalings  # restored after each call
    assert torch.equal(_sample(model, inputs), default)


def test_lora_scale_is_restored_when_the_forward_fails():
    model, inputs = _lora_model("sigma-mask"), variant_inputs("sigma-mask")
    scalings = _scalings(model)
    with pytest.raises(ValueError):
        model(**{**inputs, "timestep": None}, cross_attention_kwargs={"scale": 0.3})
    assert _scalings(model) == scalings


def test_other_cross_attention_kwargs_are_ignored_with_a_warning(monkeypatch):
    model, inputs = _lora_model("sigma-mask"), variant_inputs("sigma-mask")
    warnings = []
    monkeypatch.setattr(mixins.logger, "warning", lambda message, *args: warnings.append(message))
    expected = _sample(model, inputs)
    kwargs = {"scale": 1.0, "gligen": None}
    assert torch.equal(_sample(model, inputs, cross_attention_kwargs=kwargs), expected)
    assert kwargs == {"scale": 1.0, "gligen": None}  # the caller's dict is not changed
    assert len(warnings) == 1 and "['gligen']" in warnings[0] and "ignored" in warnings[0]
