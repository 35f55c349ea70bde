"""The one attention module of the toolkit."""

from __future__ import annotations

import torch
from torch import nn

from ..linear import Linear
from .backends import AttentionBackend, get_backend
from .kv_compress import KVCompress
from .ops import grid_to_tokens, keep_from_mask, merge_heads, relu_linear_attention, split_heads, tokens_to_grid
from .rope import RotaryEmbedding, apply_rotary


def _softmax(attn: DiTAttention, q, k, v, mask):
    return attn.backend.kernel(q, k, v, mask)  # the registered softmax backend (sdpa / math / xformers)


def _linear(attn: DiTAttention, q, k, v, mask):
    return relu_linear_attention(q, k, v, keep_from_mask(mask))


#: ``kernel`` option -> ``(module, q, k, v, mask) -> out``, all ``(B, L, H, D)``.
KERNELS = {"softmax": _softmax, "linear": _linear}


class DiTAttention(nn.Module):
    """Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    Self-attention when ``encoder_hidden_states`` is None, cross-attention otherwise. Variants are options of this
    one module, each a small pure op or submodule:

    - ``kernel="softmax"``: a registered backend (``sdpa`` by default, ``math`` as the plain reference,
      ``xformers`` on CUDA); ``kernel="linear"``: ReLU linear attention accumulated in fp32 (LiT).
    - ``kv_compress_ratio``: keys and values on a coarser grid (PixArt-Σ), queries untouched (:class:`KVCompress`).
    - ``conv_kernel_size``: a depthwise convolution of the values over the token grid added to the output (``dwc``,
      LiT's locality term; zero-initialised, so an inherited model starts from plain linear attention).
    - ``qk_norm``: a non-affine LayerNorm over each head of the queries and keys (FiTv2), before any rotary
      embedding; it has no parameters, so the state dict is unchanged.
    - rotary position embedding (FiT's 2D RoPE, :mod:`dit.nn.attention.rope`): ``rotary=RotaryEmbedding(...)`` in
      ``forward`` rotates queries and keys of self-attention and applies its logit scale to the queries.

    Grid options need ``grid=(h, w)`` in ``forward``.

    Args:
        query_dim: width of the query tokens.
        heads: number of heads.
        dim_head: width of one head.
        cross_attention_dim: width of the key/value tokens when it differs from ``query_dim``.
        bias: bias on the q/k/v projections.
        out_bias: bias on the output projection.
        dropout: dropout after the output projection.
        kernel: ``softmax`` or ``linear``.
        kv_compress_ratio: spatial stride of key/value compression (None: off).
        kv_compress_mode: ``conv``, ``avg`` or ``uniform``.
        conv_kernel_size: side of the depthwise value convolution (None: off).
        qk_norm: LayerNorm (no affine parameters, eps 1e-6) over each query and key head.
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
        kernel: str = "softmax",
        kv_compress_ratio: int | None = None,
        kv_compress_mode: str = "conv",
        conv_kernel_size: int | None = None,
        qk_norm: bool = False,
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"Unknown attention kernel {kernel!r}; choose one of {sorted(KERNELS)}.")
        if (kv_compress_ratio or conv_kernel_size) and cross_attention_dim is not None:
            raise ValueError("kv_compress_ratio and conv_kernel_size are self-attention options (they need a grid).")
        inner_dim = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.kernel = heads, kernel
        self.to_q = Linear(query_dim, inner_dim, bias=bias)
        self.to_k = Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = Linear(kv_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.kv_compress = KVCompress(inner_dim, kv_compress_ratio, kv_compress_mode) if kv_compress_ratio else None
        self.dwc = None
        if conv_kernel_size:
            self.dwc = nn.Conv2d(
                inner_dim, inner_dim, conv_kernel_size, padding=conv_kernel_size // 2, groups=inner_dim
            )
            nn.init.zeros_(self.dwc.weight)
            nn.init.zeros_(self.dwc.bias)
        self.norm_q = self.norm_k = None
        if qk_norm:
            self.norm_q = nn.LayerNorm(dim_head, eps=1e-6, elementwise_affine=False, bias=False)
            self.norm_k = nn.LayerNorm(dim_head, eps=1e-6, elementwise_affine=False, bias=False)
        self.backend: AttentionBackend = get_backend("sdpa")

    @property
    def needs_grid(self) -> bool:
        return self.kv_compress is not None or self.dwc is not None

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` (B, N, C) attend to ``encoder_hidden_states`` (B, L, C') or to themselves.

        ``mask`` is the kernel's key mask, made once per forward by the model (see ``AttentionBackend``); ``grid``
        the (h, w) token grid of ``hidden_states``, needed by KV compression and the value convolution;
        ``rotary`` the per-token rotary tables (B, N, 1, D) and logit scale of self-attention.
        """
        if self.needs_grid and grid is None:
            raise ValueError(
                "This attention compresses keys or convolves values over the token grid: pass grid=(h, w)."
            )
        if rotary is not None and (encoder_hidden_states is not None or self.kv_compress is not None):
            raise ValueError("Rotary embedding needs queries and keys at the same positions: self-attention only.")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self.to_q(hidden_states)  # (B, N, C)
        k, v = self.to_k(context), self.to_v(context)  # (B, L, C)
        local = None if self.dwc is None else self._value_conv(v, mask, grid)  # (B, N, C)
        if self.kv_compress is not None:
            if mask is not None:
                raise ValueError("KV compression cannot pool an image-token mask; drop attention_mask or the ratio.")
            k, v = self.kv_compress(k, grid), self.kv_compress(v, grid)  # (B, L', C): one module for both
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))  # (B, *, H, D)
        q, k = self._position_queries_keys(q, k, rotary)  # (B, *, H, D)
        out = merge_heads(KERNELS[self.kernel](self, q, k, v, mask))  # (B, N, C)
        if local is not None:
            out = out + local
        return self.to_out[1](self.to_out[0](out))

    def _position_queries_keys(
        self, q: torch.Tensor, k: torch.Tensor, rotary: RotaryEmbedding | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """QK-norm, then rotation, then the logit scale on the queries; each step only where it is enabled."""
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)  # (B, *, H, D), per head
        if rotary is None:
            return q, k
        q, k = apply_rotary(q, rotary.cos, rotary.sin), apply_rotary(k, rotary.cos, rotary.sin)  # (B, N, H, D)
        if rotary.logit_scale is not None:
            q = q * rotary.logit_scale.to(q.dtype)  # (B, N, H, D): logits times the scale
        return q, k

    def _value_conv(self, v: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        keep = keep_from_mask(mask)
        if keep is not None:
            v = v * keep[:, :, None].to(v.dtype)  # padding contributes nothing to its neighbours
        return grid_to_tokens(self.dwc(tokens_to_grid(v, grid)))  # (B, N, C)
