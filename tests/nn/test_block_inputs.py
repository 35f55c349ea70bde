"""A block leaves the hidden states it was given unchanged, also without autograd (where its later residuals update
the stream in place): diffusers' cache hooks take ``output - input`` as the block's residual."""

from __future__ import annotations

import pytest
import torch

from dit.nn.attention.rope import rotary_embedding
from dit.nn.blocks import FiTBlock, PixArtBlock
from dit.nn.context import BlockContext


def _pixart():
    block = PixArtBlock(16, 2, 8, cross_attention_dim=16).eval()
    return block, BlockContext(encoder_hidden_states=torch.randn(2, 5, 16), shared_modulation=torch.randn(2, 96))


def _fit():
    block = FiTBlock(16, 2, 8, cross_attention_dim=16, ff_inner_dim=32, adaln_lora_dim=4).eval()
    positions = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).reshape(1, 6, 2)
    positions, sizes = positions.expand(2, -1, -1), torch.tensor([[2, 3], [2, 3]])
    context = BlockContext(
        encoder_hidden_states=torch.randn(2, 5, 16), shared_modulation=torch.randn(2, 96),
        condition=torch.randn(2, 16), grid=(2, 3), rotary=rotary_embedding(positions, sizes, 8, (2, 3)),
    )  # fmt: skip
    return block, context


@pytest.mark.parametrize("make", [_pixart, _fit], ids=["pixart", "fit"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_block_leaves_its_input_unchanged(make, grad):
    torch.manual_seed(0)
    block, context = make()
    x = torch.randn(2, 6, 16)
    before = x.clone()
    with torch.set_grad_enabled(grad):
        out = block(x, context)
    assert torch.equal(x, before)
    assert not torch.allclose(out, before)
