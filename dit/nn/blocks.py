"""Transformer blocks (PixArt, FiTv2) built from the shared attention module and adaLN modulation; every block
takes ``(hidden_states, context)`` with the per-forward :class:`~dit.nn.context.BlockContext`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionSpec, DiTAttention
from .context import BlockContext
from .linear import Linear
from .normalization import modulate

ACTIVATIONS = {"gelu": "none", "gelu-approximate": "tanh"}


def residual(
    x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor | None = None, inplace: bool = True
) -> torch.Tensor:
    """``x + gate * update`` (or ``x + update``); without autograd ``x``, the running hidden state, is updated in place
    unless ``inplace=False`` (a block's first residual: its input stays what the caller passed)."""
    if not inplace or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, update, gate))):
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
        self_attention: the options of the self-attention (kernel, KV compression, value convolution, QK-norm, and
            ``heads`` to override the head count over the same width); None: plain softmax.
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
        self_attention: AttentionSpec | None = None,
        attention_heads: int | None = None,
        feed_forward: nn.Module | None = None,
    ):
        super().__init__()
        heads, head_dim = attention_heads or num_attention_heads, attention_head_dim
        spec = self_attention or AttentionSpec()
        self_heads = spec.heads or heads
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = DiTAttention(
            dim, self_heads, heads * head_dim // self_heads, bias=attention_bias, dropout=dropout, spec=spec
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn2 = None
        if cross_attention_dim is not None:
            self.attn2 = DiTAttention(dim, heads, head_dim, cross_attention_dim, bias=attention_bias, dropout=dropout)
        self.ff = feed_forward or FeedForward(dim, dropout=dropout, activation_fn=activation_fn)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """``hidden_states`` (B, N, D) -> (B, N, D); reads the context's shared modulation (B, 6D), text, masks and
        token grid."""
        batch = hidden_states.shape[0]
        modulation = self.scale_shift_table[None] + context.shared_modulation.reshape(batch, 6, -1)  # (B, 6, D)
        return modulated_sublayers(self, hidden_states, modulation, context, grid=context.grid)


def modulated_sublayers(
    block: nn.Module,
    hidden_states: torch.Tensor,
    modulation: torch.Tensor,
    context: BlockContext,
    normed_cross_attention: bool = False,
    **self_attention_kwargs,
) -> torch.Tensor:
    """The body shared by PixArt-style blocks: adaLN-modulated, gated self-attention (``block.attn1``, given
    ``self_attention_kwargs`` such as ``grid`` or ``rotary``), un-gated cross-attention (``block.attn2``, if any) and
    a gated feed-forward (``block.ff``); ``modulation`` (B, 6, D) holds shift/scale/gate of both gated sublayers,
    ``context`` the text tokens and masks. The feed-forward's input is ``block.norm2``'s, and the cross-attention's
    the raw hidden states (PixArt); with ``normed_cross_attention`` (MicroDiT, diffusers' ``BasicTransformerBlock``
    order) the cross-attention reads ``block.norm2`` and the feed-forward ``block.norm3``."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # (B, 1, D)

    # Inputs built inline, so no local name keeps them alive while the sublayer allocates its own buffers.
    # Without autograd the residual stream is updated in place (see residual()), after the first residual, which
    # leaves the block's input unchanged (diffusers' cache hooks compare a block's output with its input).
    attn_out = block.attn1(
        modulate(block.norm1(hidden_states), shift_msa, scale_msa),
        mask=context.attention_mask,
        **self_attention_kwargs,
    )
    hidden_states = residual(hidden_states, attn_out, gate_msa, inplace=False)  # (B, N, D), a new tensor
    del attn_out

    if block.attn2 is not None:
        query = block.norm2(hidden_states) if normed_cross_attention else hidden_states  # (B, N, D)
        cross_out = block.attn2(query, context.encoder_hidden_states, context.encoder_attention_mask)
        hidden_states = residual(hidden_states, cross_out)  # (B, N, D)
        del cross_out, query

    ff_norm = block.norm3 if normed_cross_attention else block.norm2
    ff_out = block.ff(modulate(ff_norm(hidden_states), shift_mlp, scale_mlp))  # (B, N, D)
    return residual(hidden_states, ff_out, gate_mlp)


# ----- FiTv2 ----------------------------------------------------------------------------------------------------
class SwiGLUProjection(nn.Module):
    """``hidden * silu(gate)`` from one projection ``proj`` (d -> 2 * inner), as diffusers' ``SwiGLU``."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = Linear(dim_in, 2 * dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, inner) each
        return hidden * F.silu(gate)


class SwiGLUFeedForward(nn.Module):
    """``net.0.proj`` -> SwiGLU -> dropout -> ``net.2``: diffusers' ``FeedForward(activation_fn="swiglu")`` keys
    (``bias``: on both projections)."""

    def __init__(self, dim: int, inner_dim: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        layers = [SwiGLUProjection(dim, inner_dim, bias=bias), nn.Dropout(dropout), Linear(inner_dim, dim, bias=bias)]
        self.net = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class LowRankModulation(nn.Module):
    """The per-block branch of AdaLN-LoRA: ``linear_2(linear_1(c))``, d -> r -> 6d, ``linear_2`` zero-initialised."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.linear_1 = Linear(dim, rank)
        self.linear_2 = Linear(rank, 6 * dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.linear_1(cond))  # (B, 6D)


class FiTBlock(nn.Module):
    """FiTv2 block: gated QK-norm + 2D-RoPE self-attention, un-gated cross-attention to text, gated SwiGLU.

    The six modulation vectors are the model's shared ``Linear(d, 6d)`` output plus this block's low-rank
    ``adaln_lora`` of the same (SiLU-activated) condition (FiTv2's AdaLN-LoRA).

    Args:
        dim: token width.
        num_attention_heads: heads.
        attention_head_dim: width of one head (divisible by 4 for 2D RoPE).
        cross_attention_dim: width of the text tokens; None for a block without cross-attention.
        ff_inner_dim: hidden width of the SwiGLU.
        adaln_lora_dim: rank of the per-block modulation.
        qk_norm: per-head non-affine LayerNorm on queries and keys (both attentions).
        attention_bias: bias on q/k/v projections.
        dropout: dropout in attention outputs and the feed-forward.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int | None,
        ff_inner_dim: int,
        adaln_lora_dim: int,
        qk_norm: bool = True,
        attention_bias: bool = True,
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        heads, head_dim, spec = num_attention_heads, attention_head_dim, AttentionSpec(qk_norm=qk_norm)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.attn1 = DiTAttention(dim, heads, head_dim, bias=attention_bias, dropout=dropout, spec=spec)
        self.attn2 = None
        if cross_attention_dim is not None:
            self.attn2 = DiTAttention(
                dim, heads, head_dim, cross_attention_dim, bias=attention_bias, dropout=dropout, spec=spec
            )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ff = SwiGLUFeedForward(dim, ff_inner_dim, dropout)
        self.adaln_lora = LowRankModulation(dim, adaln_lora_dim)

    def forward(self, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """``hidden_states`` (B, N, D) -> (B, N, D); reads the context's condition (B, D), shared modulation
        (B, 6D), text, masks and the rotary tables of the N tokens."""
        modulation = (context.shared_modulation + self.adaln_lora(context.condition)).unflatten(1, (6, -1))
        return modulated_sublayers(self, hidden_states, modulation, context, rotary=context.rotary)  # (B, N, D)
