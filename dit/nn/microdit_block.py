"""The blocks of MicroDiT as published (Sony's ``micro_diffusion``, arXiv 2407.15811): the adaLN block of its patch
mixer and backbone, the pre-norm block over the caption tokens, and the LayerNorm + Linear maps between the mixer's
width and the backbone's. Their widths follow the original's rounding rules (:func:`attention_width`,
:func:`swiglu_hidden`, :func:`expert_hidden`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import AttentionMask, AttentionSpec, DiTAttention
from .blocks import SwiGLUFeedForward, modulated_sublayers, residual
from .context import BlockContext
from .linear import Linear


def attention_width(dim: int, ratio: float, head_dim: int) -> int:
    """A self-attention's width at ``ratio`` of ``dim``: ``int(dim * ratio)`` rounded up to a multiple of
    ``2 * head_dim``; exactly ``dim`` at ratio 1 (MicroDiT's layer-wise scaling)."""
    if ratio == 1:
        return dim
    return 2 * head_dim * math.ceil(int(dim * ratio) / (2 * head_dim))


def swiglu_hidden(dim: int, ratio: float, multiple_of: int) -> int:
    """A SwiGLU's hidden width: ``int(dim * ratio)`` times 2/3, rounded up to a multiple of ``multiple_of``."""
    return multiple_of * math.ceil(int(2 * int(dim * ratio) / 3) / multiple_of)


def expert_hidden(dim: int, ratio: float, multiple_of: int) -> int:
    """An expert MLP's hidden width: ``int(dim * ratio)`` rounded up to a multiple of ``multiple_of`` (no 2/3)."""
    return multiple_of * math.ceil(int(dim * ratio) / multiple_of)


def microdit_attention_spec(norm_eps: float) -> AttentionSpec:
    """MicroDiT's attention options: a non-affine LayerNorm over the full width on queries and keys."""
    return AttentionSpec(qk_norm="layer_norm_across_heads", qk_norm_affine=False, qk_norm_eps=norm_eps)


def bias_free_norm(dim: int, eps: float) -> nn.LayerNorm:
    """MicroDiT's LayerNorm: a weight, no bias."""
    return nn.LayerNorm(dim, eps=eps, bias=False)


class MicroDiTBlock(nn.Module):
    """MicroDiT's ``DiTBlock``: per-block adaLN, gated self-attention, normed un-gated cross-attention, gated
    feed-forward.

    ``adaln_modulation`` (the original's ``adaLN_modulation.1``) maps the activated condition (the context's
    ``condition``, GELU(tanh) of the timestep + pooled-caption embedding, ``cond_dim`` wide) to the six shift /
    scale / gate vectors; then ``x += gate_msa * attn1(modulate(norm1(x)))``, ``x += attn2(norm2(x), text)`` and
    ``x += gate_mlp * ff(modulate(norm3(x)))``. The norms are bias-free affine LayerNorms; both attentions
    normalise queries and keys over their full width (non-affine); the self-attention may be narrower than the
    tokens (layer-wise scaling), the cross-attention is always ``dim`` wide.

    Args:
        dim: token width.
        attention_head_dim: width of one head.
        self_attention_dim: width of the self-attention (a multiple of ``attention_head_dim``).
        cross_attention_dim: width of the text tokens.
        cond_dim: width of the condition.
        feed_forward: the feed-forward ``ff`` (a SwiGLU or an expert-choice MoE).
        bias: biases on the attention projections.
        norm_eps: epsilon of every LayerNorm, QK-norms included.
    """

    def __init__(
        self,
        dim: int,
        attention_head_dim: int,
        self_attention_dim: int,
        cross_attention_dim: int,
        cond_dim: int,
        feed_forward: nn.Module,
        bias: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        head_dim, spec = attention_head_dim, microdit_attention_spec(norm_eps)
        if self_attention_dim % head_dim or dim % head_dim:
            raise ValueError(f"Attention widths {self_attention_dim} and {dim} must be multiples of {head_dim}.")
        self.norm1 = bias_free_norm(dim, norm_eps)
        self.attn1 = DiTAttention(dim, self_attention_dim // head_dim, head_dim, bias=bias, out_bias=bias, spec=spec)
        self.norm2 = bias_free_norm(dim, norm_eps)
        self.attn2 = DiTAttention(
            dim, dim // head_dim, head_dim, cross_attention_dim, bias=bias, out_bias=bias, spec=spec
        )
        self.norm3 = bias_free_norm(dim, norm_eps)
        self.ff = feed_forward
        self.adaln_modulation = Linear(cond_dim, 6 * dim)

    def forward(self, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """``hidden_states`` (B, N, D) -> (B, N, D); reads the context's activated condition (B, cond_dim), text and
        masks."""
        modulation = self.adaln_modulation(context.condition).unflatten(1, (6, -1))  # (B, 6, D)
        return modulated_sublayers(self, hidden_states, modulation, context, normed_cross_attention=True)


class MicroDiTCaptionBlock(nn.Module):
    """The pre-norm transformer block MicroDiT runs over the projected caption tokens (the original's
    ``y_emb_preprocess``): ``y += attn1(norm1(y))`` (QK-normed self-attention), ``y += ff(norm2(y))`` (SwiGLU).

    Args:
        dim: token width.
        attention_head_dim: width of one head.
        ff_inner_dim: hidden width of the SwiGLU.
        bias: biases on the attention and SwiGLU projections.
        norm_eps: epsilon of every LayerNorm.
    """

    def __init__(self, dim: int, attention_head_dim: int, ff_inner_dim: int, bias: bool = False, norm_eps=1e-6):
        super().__init__()
        spec = microdit_attention_spec(norm_eps)
        self.norm1 = bias_free_norm(dim, norm_eps)
        self.attn1 = DiTAttention(
            dim, dim // attention_head_dim, attention_head_dim, bias=bias, out_bias=bias, spec=spec
        )
        self.norm2 = bias_free_norm(dim, norm_eps)
        self.ff = SwiGLUFeedForward(dim, ff_inner_dim, bias=bias)

    def forward(self, caption: torch.Tensor, mask: AttentionMask | None = None) -> torch.Tensor:
        """Caption tokens (B, L, D) -> (B, L, D); ``mask`` drops padded keys (None: every token is read)."""
        caption = residual(caption, self.attn1(self.norm1(caption), mask=mask), inplace=False)  # (B, L, D)
        return residual(caption, self.ff(self.norm2(caption)))  # (B, L, D)


class NormProjection(nn.Module):
    """A bias-free LayerNorm ``norm`` then ``linear``: MicroDiT's maps between the backbone's width and a narrower
    patch mixer's (``patch_mixer_map_xin`` / ``_xout`` / ``_y``)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = bias_free_norm(dim_in, norm_eps)
        self.linear = Linear(dim_in, dim_out, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(hidden_states))  # (B, N, dim_out)
