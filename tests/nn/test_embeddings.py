"""Position embeddings: the per-sample fractional sin-cos table against PixArt's table and its formula."""

import pytest
import torch

from dit.nn.embeddings import fractional_sincos, sincos_1d, sincos_2d
from dit.nn.packing import token_layout


@pytest.mark.parametrize("sizes", [[(4, 4)], [(2, 6), (6, 3)], [(8, 8), (1, 1)]], ids=["square", "mixed", "tiny"])
def test_square_base_grid_matches_pixart_table(sizes):
    layout = token_layout(torch.tensor(sizes), (8, 8))
    table = fractional_sincos(layout.positions, layout.sizes, (4, 4), 32)  # (B, L, 32)
    assert table.shape == (len(sizes), layout.keep.shape[1], 32) and table.dtype == torch.float32
    for i, (h, w) in enumerate(sizes):
        torch.testing.assert_close(table[i, : h * w], sincos_2d(32, h, w, base_size=4, interpolation_scale=1))


def test_non_square_base_grid_scales_each_axis_by_its_own_length():
    """Base grid 4 x 8: a 2 x 4 image's token (1, 3) sits at row 1 * 4/2 = 2 and column 3 * 8/4 = 6."""
    layout = token_layout(torch.tensor([[2, 4]]), (2, 4))
    table = fractional_sincos(layout.positions, layout.sizes, (4, 8), 16)
    token = table[0, 1 * 4 + 3]  # row 1, column 3
    expected = torch.cat([sincos_1d(8, torch.tensor([6.0])), sincos_1d(8, torch.tensor([2.0]))], dim=1)[0]
    torch.testing.assert_close(token, expected.float())


def test_width_must_divide_by_four():
    layout = token_layout(torch.tensor([[2, 2]]), (2, 2))
    with pytest.raises(ValueError, match="divisible by 4, got 18"):
        fractional_sincos(layout.positions, layout.sizes, (2, 2), 18)
