"""The one attention module of the toolkit."""

from __future__ import annotations

import torch
from torch import nn

from ..linear import Linear
from .backends import AttentionBackend, get_backend
from .ops import merge_heads, split_heads


class DiTAttention(nn.Module):
    """Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    Self-attention when ``encoder_hidden_states`` is None, cross-attention otherwise. The softmax kernel is
    a registered backend (``sdpa`` by default, ``math`` as the plain reference, ``xformers`` on CUDA);
    variants (masks now; linear kernels, KV compression and RoPE later) are options of this module, built
    from the pure ops in :mod:`dit.attention.ops`.

    Args:
        query_dim: width of the query tokens.
        heads: number of heads.
        dim_head: width of one head.
        cross_attention_dim: width of the key/value tokens when it differs from ``query_dim``.
        bias: bias on the q/k/v projections.
        out_bias: bias on the output projection.
        dropout: dropout after the output projection.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner_dim, bias=bias)
        self.to_k = Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = Linear(kv_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.backend: AttentionBackend = get_backend("sdpa")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` (B, N, C) attend to ``encoder_hidden_states`` (B, L, C') or to themselves.

        ``mask`` is the kernel's key mask, made once per forward by the model (see ``AttentionBackend``).
        """
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = split_heads(self.to_q(hidden_states), self.heads)  # (B, N, H, D)
        k = split_heads(self.to_k(context), self.heads)  # (B, L, H, D)
        v = split_heads(self.to_v(context), self.heads)  # (B, L, H, D)
        out = self.backend.kernel(q, k, v, mask)  # (B, N, H, D)
        out = self.to_out[0](merge_heads(out))  # (B, N, C)
        return self.to_out[1](out)
