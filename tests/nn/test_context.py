"""BlockContext: frozen, documented, and what the blocks of both families read."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dit.nn.attention import AttentionMask, get_backend
from dit.nn.attention.rope import rotary_embedding
from dit.nn.blocks import FiTBlock, PixArtBlock
from dit.nn.context import BlockContext


def test_context_is_frozen_and_every_field_is_documented():
    context = BlockContext(grid=(2, 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.grid = (3, 2)
    for field in dataclasses.fields(BlockContext):
        assert f"{field.name}:" in BlockContext.__doc__, field.name


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_pixart_block_reads_text_modulation_and_masks_from_the_context(masked):
    torch.manual_seed(0)
    block = PixArtBlock(16, 2, 8, cross_attention_dim=16).eval()
    x, text = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    bias = torch.zeros(2, 1, 1, 5)
    bias[0, ..., 3:] = -10000.0
    mask = AttentionMask.from_bias(bias, get_backend("sdpa"), 2, 6)
    context = BlockContext(
        encoder_hidden_states=text,
        encoder_attention_mask=mask if masked else None,
        shared_modulation=torch.randn(2, 96),
        grid=(2, 3),
    )
    with torch.no_grad():
        out = block(x.clone(), context)
        other_text = block(x.clone(), dataclasses.replace(context, encoder_hidden_states=text.flip(1)))
        ignored = block(x.clone(), dataclasses.replace(context, condition=torch.randn(2, 16)))
    assert out.shape == (2, 6, 16) and torch.equal(out, ignored)
    assert not torch.allclose(out, other_text)


def test_fit_block_reads_condition_and_rotary_from_the_context():
    torch.manual_seed(0)
    block = FiTBlock(16, 2, 8, cross_attention_dim=16, ff_inner_dim=32, adaln_lora_dim=4).eval()
    torch.nn.init.normal_(block.adaln_lora.linear_2.weight)  # zero at init: make the condition matter
    positions = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).reshape(1, 6, 2)
    sizes = torch.tensor([[2, 3]])
    context = BlockContext(
        encoder_hidden_states=torch.randn(1, 5, 16),
        shared_modulation=torch.randn(1, 96),
        condition=torch.randn(1, 16),
        grid=(2, 3),
        rotary=rotary_embedding(positions, sizes, 8, (2, 3)),
        image_sizes=sizes,
    )
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        out = block(x.clone(), context)
        moved = block(x.clone(), dataclasses.replace(context, condition=torch.randn(1, 16)))
    assert out.shape == (1, 6, 16) and not torch.allclose(out, moved)
