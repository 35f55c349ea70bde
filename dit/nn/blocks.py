"""Transformer blocks built from the shared attention module and adaLN-single modulation."""

from __future__ import annotations

import torch
from torch import nn

from .attention import DiTAttention
from .linear import Linear
from .normalization import modulate

ACTIVATIONS = {"gelu": "none", "gelu-approximate": "tanh"}


def residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``x + gate * update`` (or ``x + update``); without autograd ``x``, the running hidden state, is updated in place."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, update, gate)):
        return x + update if gate is None else torch.addcmul(x, gate, update)
    return x.add_(update) if gate is None else x.addcmul_(gate, update)


class GELUProjection(nn.Module):
    """``gelu(proj(x))`` (key ``proj``), as diffusers' ``GELU`` activation module."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh", bias: bool = True):
        super().__init__()
        self.proj = Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(x)  # (B, N, 4D)
        if hidden.requires_grad:
            return nn.functional.gelu(hidden, approximate=self.approximate)
        return torch.ops.aten.gelu_(hidden, approximate=self.approximate)  # in place: one 4D-wide buffer fewer


class FeedForward(nn.Module):
    """``net.0.proj`` -> GELU -> dropout -> ``net.2``: diffusers' FeedForward keys at ``mult`` x width (or
    ``inner_dim``)."""

    def __init__(
        self,
        dim: int,
        mult: int = 4,
        dropout: float = 0.0,
        activation_fn: str = "gelu-approximate",
        inner_dim: int | None = None,
    ):
        super().__init__()
        if activation_fn not in ACTIVATIONS:
            raise ValueError(f"Unsupported activation_fn {activation_fn!r}; choose one of {sorted(ACTIVATIONS)}.")
        inner = inner_dim or dim * mult
        self.net = nn.ModuleList(
            [GELUProjection(dim, inner, ACTIVATIONS[activation_fn]), nn.Dropout(dropout), Linear(inner, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class PixArtBlock(nn.Module):
    """PixArt block: gated self-attention, un-gated cross-attention to text, gated MLP.

    Keys match diffusers' ``BasicTransformerBlock(norm_type="ada_norm_single")``: ``norm1``, ``attn1``,
    ``norm2``, ``attn2``, ``ff``, ``scale_shift_table`` (6, D).

    Args:
        dim: token width.
        num_attention_heads: heads.
        attention_head_dim: width of one head.
        cross_attention_dim: width of the text tokens; None for a block without cross-attention.
        dropout: dropout in attention outputs and the MLP.
        activation_fn: ``gelu-approximate`` (PixArt) or ``gelu``.
        attention_bias: bias on q/k/v projections.
        norm_elementwise_affine: affine LayerNorms (PixArt: False).
        norm_eps: LayerNorm epsilon.
        self_attention_options: extra :class:`DiTAttention` options of the self-attention (``kernel``,
            ``kv_compress_ratio``, ``kv_compress_mode``, ``conv_kernel_size``, and ``heads`` to override the count).
        attention_heads: heads of width ``attention_head_dim`` in both attentions, when the attention width differs
            from the token width (MicroDiT's layer-wise scaling); None: ``num_attention_heads``.
        feed_forward: a module replacing the MLP ``ff`` (e.g. an expert-choice MoE, or a scaled-width MLP).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        activation_fn: str = "gelu-approximate",
        attention_bias: bool = True,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        self_attention_options: dict | None = None,
        attention_heads: int | None = None,
        feed_forward: nn.Module | None = None,
    ):
        super().__init__()
        heads, head_dim = attention_heads or num_attention_heads, attention_head_dim
        options = dict(self_attention_options or {})
        self_heads = options.pop("heads", heads)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = DiTAttention(
            dim, self_heads, heads * head_dim // self_heads, bias=attention_bias, dropout=dropout, **options
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn2 = None
        if cross_attention_dim is not None:
            self.attn2 = DiTAttention(dim, heads, head_dim, cross_attention_dim, bias=attention_bias, dropout=dropout)
        self.ff = feed_forward or FeedForward(dim, dropout=dropout, activation_fn=activation_fn)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        timestep: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` (B, N, D) on the token ``grid`` (h, w); ``timestep`` the shared modulation (B, 6D);
        masks in kernel format."""
        batch = hidden_states.shape[0]
        modulation = self.scale_shift_table[None] + timestep.reshape(batch, 6, -1)  # (B, 6, D)
        return modulated_sublayers(
            self, hidden_states, modulation, encoder_hidden_states, attention_mask, encoder_attention_mask, grid=grid
        )


def modulated_sublayers(
    block: nn.Module,
    hidden_states: torch.Tensor,
    modulation: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    encoder_attention_mask: torch.Tensor | None,
    **self_attention_kwargs,
) -> torch.Tensor:
    """The body shared by PixArt-style blocks: adaLN-modulated, gated self-attention (``block.attn1``, given
    ``self_attention_kwargs`` such as ``grid`` or ``rotary``), un-gated cross-attention (``block.attn2``, if any) and
    a gated feed-forward (``block.ff``); ``modulation`` (B, 6, D) holds shift/scale/gate of both gated sublayers."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # (B, 1, D)

    # Inputs built inline, so no local name keeps them alive while the sublayer allocates its own buffers.
    # Without autograd the residual stream is updated in place (see residual()).
    attn_out = block.attn1(
        modulate(block.norm1(hidden_states), shift_msa, scale_msa), mask=attention_mask, **self_attention_kwargs
    )
    hidden_states = residual(hidden_states, attn_out, gate_msa)  # (B, N, D)
    del attn_out

    if block.attn2 is not None:
        cross_out = block.attn2(hidden_states, encoder_hidden_states, encoder_attention_mask)  # (B, N, D)
        hidden_states = residual(hidden_states, cross_out)
        del cross_out

    ff_out = block.ff(modulate(block.norm2(hidden_states), shift_mlp, scale_mlp))  # (B, N, D)
    return residual(hidden_states, ff_out, gate_mlp)
