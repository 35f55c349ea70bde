"""Text padding trimmed on the host to a few fixed lengths, exactly."""

import pytest
import torch

from dit import PixArtTransformer
from dit.nn.text_padding import text_length_buckets, trim_text_padding, trimmed_text_length
from tests.tiny import CONFIGS, randomize_


def _mask(lengths: list[int], total: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


@pytest.mark.parametrize(
    "lengths, total, multiple, expected",
    [
        ([5, 20], 300, 64, 64),  # the longest caption, rounded up to the multiple
        ([65, 3], 300, 64, 128),
        ([290, 3], 300, 64, 300),  # capped at the padded length
        ([300, 300], 300, 64, 300),
        ([3, 4], 120, 64, 64),
        ([3, 0], 300, 64, 300),  # an empty prompt attends uniformly to every key: nothing trimmed
        ([2, 3], 10, 4, 4),
    ],
)
def test_trimmed_length(lengths, total, multiple, expected):
    assert trimmed_text_length(_mask(lengths, total), multiple) == expected


def test_holes_count_up_to_the_last_kept_key():
    mask = torch.tensor([[0, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0]])
    assert trimmed_text_length(mask, 2) == 4


def test_every_length_is_a_bucket():
    buckets = text_length_buckets(300)
    assert buckets == [64, 128, 192, 256, 300]
    seen = {trimmed_text_length(_mask([n, 1], 300)) for n in range(1, 301)}
    assert seen == set(buckets)
    assert text_length_buckets(120) == [64, 120]


def test_bad_masks_are_named():
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        trimmed_text_length(torch.ones(2, 1, 5))
    with pytest.raises(ValueError, match=r"expected \(2, 6\) or \(1, 6\)"):
        trim_text_padding(torch.zeros(2, 6, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"shape \(3, 6\)"):
        trim_text_padding(torch.zeros(2, 6, 4), torch.ones(3, 6))


def test_a_mask_of_batch_one_is_shared():
    """PixArt-δ's CFG batch passes one mask for both halves: it is trimmed as attention broadcasts it."""
    embeds, mask = torch.randn(2, 9, 4), _mask([3], 9)
    short, short_mask = trim_text_padding(embeds, mask, multiple=4)
    assert short.shape == (2, 4, 4) and short_mask.shape == (1, 4)
    assert torch.equal(short, embeds[:, :4])


def test_no_mask_and_bias_pass_through():
    embeds = torch.randn(2, 6, 4)
    assert trim_text_padding(embeds, None)[0] is embeds
    bias = torch.zeros(2, 1, 6)
    assert trim_text_padding(embeds, bias)[1] is bias


@pytest.mark.parametrize("variant", CONFIGS.keys())
@pytest.mark.parametrize("lengths", [[3, 9], [0, 4], [30, 30]], ids=["ragged", "empty-prompt", "full"])
def test_trimming_is_exact(variant, lengths):
    """The backbone gives the same result on trimmed text as on the full padding (dropped keys have zero weight)."""
    config = CONFIGS[variant]
    torch.manual_seed(0)
    model = randomize_(PixArtTransformer(**config)).eval()
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 30, config["caption_channels"])
    mask = _mask(lengths, 30)
    short_text, short_mask = trim_text_padding(text, mask, multiple=4)
    assert short_text.shape[1] == trimmed_text_length(mask, 4)
    t = torch.tensor([10, 900])
    added = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.ones(2, 1)}
    added = added if config["use_additional_conditions"] else None
    with torch.no_grad():
        full = model(latents, text, t, added, encoder_attention_mask=mask).sample
        trimmed = model(latents, short_text, t, added, encoder_attention_mask=short_mask).sample
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-5)
