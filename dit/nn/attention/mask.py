"""The key mask of one attention input, in every form its kernels read, built once per forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import AttentionBackend
from .ops import MASKED_BIAS, keep_mask_to_bias


@dataclass(frozen=True)
class AttentionMask:
    """Which keys an attention may read, made once per forward by the backbone and handed unchanged to every block.

    The forms live side by side, so no kernel turns one into another per block: the softmax backend reads
    ``kernel`` (its ``adapt_mask`` of the additive bias), ReLU linear attention and the value convolution read
    ``keep``, and a foreign processor (diffusers' protocol) gets :meth:`diffusers_bias`.

    Args:
        keep: (B, Lk) bool, True where a key is read.
        kernel: the softmax backend's mask, e.g. a (B, 1, 1, Lk) additive bias (SDPA) or an expanded
            (B, H, Lq, Lk) one (xformers).
    """

    keep: torch.Tensor
    kernel: torch.Tensor

    @classmethod
    def from_bias(cls, bias: torch.Tensor, backend: AttentionBackend, heads: int, q_len: int) -> AttentionMask:
        """From an additive bias (B, 1, 1, Lk) (0 kept; a key is dropped where the bias is below half of
        :data:`~dit.nn.attention.ops.MASKED_BIAS`)."""
        keep = bias[:, 0, 0, :] > MASKED_BIAS / 2  # (B, Lk)
        return cls(keep=keep, kernel=backend.adapt_mask(bias, heads, q_len))

    @classmethod
    def from_keep(
        cls, keep: torch.Tensor, dtype: torch.dtype, backend: AttentionBackend, heads: int, q_len: int
    ) -> AttentionMask:
        """From a boolean keep-mask (B, Lk); the bias is built in ``dtype``."""
        bias = keep_mask_to_bias(keep, dtype)  # (B, 1, 1, Lk)
        return cls(keep=keep, kernel=backend.adapt_mask(bias, heads, q_len))

    def diffusers_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """diffusers' ``attention_mask`` for processors of its protocol: an additive bias (B, 1, Lk), 0 kept,
        :data:`~dit.nn.attention.ops.MASKED_BIAS` dropped."""
        bias = torch.zeros(self.keep.shape, dtype=dtype, device=self.keep.device)  # (B, Lk)
        return bias.masked_fill_(~self.keep, MASKED_BIAS)[:, None, :]  # (B, 1, Lk)
