"""A forward's text inputs (dit.models.inputs): a keep-mask that is host data is trimmed inside the backbone
(diffusers' pipelines on the CPU pass 300 padded tokens), exactly; a bias, or a graph being compiled, is not."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import FORWARD_VARIANTS, assert_fp32_close, randomize_, variant_inputs, variant_model

TEXT_VARIANTS = [v for v in FORWARD_VARIANTS if v != "microdit-masked"]  # MicroDiT reads no text mask


def _key_lengths(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, list[int]]:
    """The output, and the text length each cross-attention received."""
    seen = []
    hooks = [
        block.attn2.register_forward_pre_hook(lambda m, a, kw: seen.append(a[1].shape[1]), with_kwargs=True)
        for block in model.transformer_blocks
    ]
    try:
        with torch.no_grad():
            return model(**inputs)[0], seen
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_a_host_mask_is_trimmed_exactly(variant):
    model, inputs = randomize_(variant_model(variant), std=0.1), variant_inputs(variant, text_length=300)
    trimmed, lengths = _key_lengths(model, inputs)
    assert set(lengths) == {64}  # 7 kept tokens of 300, rounded up to the bucket
    mask = inputs["encoder_attention_mask"]
    bias = torch.zeros(mask.shape).masked_fill_(mask == 0, -10000.0)[:, None]  # (B, 1, L): not trimmed
    full, full_lengths = _key_lengths(model, {**inputs, "encoder_attention_mask": bias})
    assert set(full_lengths) == {300}
    assert_fp32_close(trimmed, full)


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_a_host_mask_of_batch_one_is_shared(variant):
    """One mask for a CFG batch (PixArt-δ's convention) is trimmed and broadcast, as the bias it stands for."""
    model, inputs = randomize_(variant_model(variant), std=0.1), variant_inputs(variant, text_length=300)
    shared = inputs["encoder_attention_mask"][:1]  # (1, L)
    trimmed, lengths = _key_lengths(model, {**inputs, "encoder_attention_mask": shared})
    assert set(lengths) == {64}
    bias = torch.zeros(shared.shape).masked_fill_(shared == 0, -10000.0)[:, None]  # (1, 1, L): not trimmed
    full, _ = _key_lengths(model, {**inputs, "encoder_attention_mask": bias})
    assert_fp32_close(trimmed, full)


def test_nothing_is_read_inside_a_compiled_graph():
    """Trimming reads the mask's values: inside a graph it would break it (data-dependent length)."""
    model, inputs = variant_model("sigma-mask"), variant_inputs("sigma-mask", text_length=300)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
