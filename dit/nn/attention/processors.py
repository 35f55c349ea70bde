"""Attention processors of :class:`~dit.nn.attention.DiTAttention`, in diffusers' processor protocol.

:class:`DiTAttnProcessor` is the default (:class:`FusedDiTAttnProcessor` once the projections are fused): it runs the toolkit's kernels (softmax backends, ReLU linear attention, KV
compression, value convolution, QK-norm, rotary embedding) on masks already in the kernel's format. Any other processor
(diffusers' ``AttnProcessor2_0``, PAG's identity processors, a user's) is called the way diffusers' ``Attention``
calls it: ``processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=<(B, 1, Lk) additive bias>,
**kwargs)``, with ``kwargs`` the extra keywords the caller of the module gave.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.utils import logging

from ..kernels import use_kernels
from .kv_compress import MODES, PADDINGS
from .mask import AttentionMask
from .ops import grid_to_tokens, merge_heads, relu_linear_attention, split_heads, tokens_to_grid
from .rope import RotaryEmbedding, apply_rotary

logger = logging.get_logger(__name__)

# ``attn`` below is a :class:`~dit.nn.attention.DiTAttention` (a diffusers ``Attention``; this module is below it).


def _softmax(attn: Attention, q, k, v, mask: AttentionMask | None):
    # the registered softmax backend (sdpa / math / xformers / diffusers'), on the mask in its own format
    return attn.backend.kernel(q, k, v, None if mask is None else mask.kernel)


def _linear(attn: Attention, q, k, v, mask: AttentionMask | None):
    keep = None if mask is None else mask.keep  # (B, Lk)
    if use_kernels(q, k, v, batch_tokens=q.shape[0] * q.shape[1]):  # Triton (CUDA): fp32 state, bf16 tensor cores
        from ..kernels.linear_attention import triton_linear_attention

        return triton_linear_attention(q, k, v, keep)
    return relu_linear_attention(q, k, v, keep)


#: ``kernel`` option -> ``(module, q, k, v, mask) -> out``, all ``(B, L, H, D)``.
KERNELS = {"softmax": _softmax, "linear": _linear}
#: ``qk_norm`` option -> its name in :class:`AttentionSpec` (None: off).
QK_NORMS = {False: None, None: None, True: "layer_norm", "layer_norm": "layer_norm",
            "layer_norm_across_heads": "layer_norm_across_heads"}  # fmt: skip


@dataclass(frozen=True)
class AttentionSpec:
    """The options of one :class:`~dit.nn.attention.DiTAttention`, typed and checked once, where it is built.

    Args:
        kernel: a key of :data:`KERNELS`: ``softmax`` (the model's softmax backend) or ``linear`` (ReLU linear
            attention, LiT).
        heads: the head count of this attention when it differs from its block's (LiT's linear self-attention has
            a quarter of the heads over the same width); None: the block's.
        kv_compress_ratio: spatial stride of key/value compression, an int >= 2 (PixArt-Σ); None: off.
        kv_compress_mode: a key of :data:`~dit.nn.attention.kv_compress.MODES` (``conv``, ``avg``, ``uniform``,
            ``ave``).
        kv_compress_padding: ``replicate`` (any grid, every token reaches a cell) or ``none`` (PixArt-Σ: drop the
            remainder rows/columns).
        conv_kernel_size: side of the depthwise value convolution (LiT: 5); None: off.
        qk_norm: None; ``layer_norm`` (per head, no parameters; ``True`` is accepted for it); or
            ``layer_norm_across_heads`` (PixArt-Σ: full width, affine).
        qk_norm_affine: whether the QK-norm has a weight and a bias; None: its kind's (per head: no, PixArt-Σ's
            across heads: yes). MicroDiT's is ``layer_norm_across_heads`` with ``qk_norm_affine=False``.
        qk_norm_eps: the QK-norm's epsilon; None: its kind's (per head 1e-6, across heads 1e-5).
    """

    kernel: str = "softmax"
    heads: int | None = None
    kv_compress_ratio: int | None = None
    kv_compress_mode: str = "conv"
    kv_compress_padding: str = "replicate"
    conv_kernel_size: int | None = None
    qk_norm: str | bool | None = None
    qk_norm_affine: bool | None = None
    qk_norm_eps: float | None = None

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"Unknown attention kernel {self.kernel!r}; choose one of {sorted(KERNELS)}.")
        if not isinstance(self.qk_norm, (bool, str, type(None))) or self.qk_norm not in QK_NORMS:
            raise ValueError(
                f"Unknown qk_norm {self.qk_norm!r}; choose False, True ('layer_norm', per head) or "
                "'layer_norm_across_heads'."
            )
        object.__setattr__(self, "qk_norm", QK_NORMS[self.qk_norm])
        _check_qk_norm_options(self.qk_norm, self.qk_norm_affine, self.qk_norm_eps)
        _check_optional_int("heads", self.heads, 1)
        _check_optional_int("kv_compress_ratio", self.kv_compress_ratio, 2)
        _check_optional_int("conv_kernel_size", self.conv_kernel_size, 1)
        if self.kv_compress_mode not in MODES:
            raise ValueError(f"Unknown kv_compress_mode {self.kv_compress_mode!r}; choose one of {sorted(MODES)}.")
        if self.kv_compress_padding not in PADDINGS:
            raise ValueError(
                f"Unknown kv_compress_padding {self.kv_compress_padding!r}; choose one of {sorted(PADDINGS)}."
            )

    @property
    def needs_grid(self) -> bool:
        """Whether the attention reads the token grid (KV compression or the value convolution)."""
        return self.kv_compress_ratio is not None or self.conv_kernel_size is not None


def _check_qk_norm_options(qk_norm: str | None, affine, eps) -> None:
    if (affine is not None or eps is not None) and qk_norm is None:
        raise ValueError("qk_norm_affine and qk_norm_eps are options of a QK-norm: set qk_norm too.")
    if affine is not None and not isinstance(affine, bool):
        raise ValueError(f"qk_norm_affine must be None or a bool, got {affine!r}.")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0):
        raise ValueError(f"qk_norm_eps must be None or a number > 0, got {eps!r}.")


def _check_optional_int(name: str, value, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low):
        raise ValueError(f"{name} must be None or an int >= {low}, got {value!r}.")


class DiTAttnProcessor:
    """The default processor: the toolkit's kernels, with every option of the module (see :class:`DiTAttention`).

    ``mask`` is in the kernel's format (made once per forward by the model, see ``AttentionBackend``), ``grid`` the
    (h, w) token grid of ``hidden_states`` and ``rotary`` the rotary tables of self-attention. Subclass it to customise
    the computation and keep these inputs; any processor that is not one is called as diffusers calls processors.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        mask: AttentionMask | None = None,
        grid: tuple[int, int] | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` (B, N, C) attend to ``encoder_hidden_states`` (B, L, C') or to themselves: (B, N, C)."""
        if attn.needs_grid and grid is None:
            raise ValueError(
                "This attention compresses keys or convolves values over the token grid: pass grid=(h, w)."
            )
        if rotary is not None and (encoder_hidden_states is not None or attn.kv_compress is not None):
            raise ValueError("Rotary embedding needs queries and keys at the same positions: self-attention only.")
        q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)  # (B, N, C), (B, L, C) x 2
        values = v  # (B, N, C): the value convolution's input
        if getattr(attn, "qk_norm", None) == "layer_norm_across_heads":
            q, k = attn.norm_q(q), attn.norm_k(k)  # (B, N, C), over the full width, before compression
        if attn.kv_compress is not None:
            if mask is not None:
                raise ValueError("KV compression cannot pool an image-token mask; drop attention_mask or the ratio.")
            k, v = attn.kv_compress.forward_pair(k, v, grid)  # (B, L', C) x 2: one module, one pooling when fused
        q, k, v = (split_heads(t, attn.heads) for t in (q, k, v))  # (B, *, H, D)
        q, k = _position_queries_keys(attn, q, k, rotary)  # (B, *, H, D)
        out = merge_heads(KERNELS[attn.kernel](attn, q, k, v, mask))  # (B, N, C)
        if attn.dwc is not None:
            out = _add_value_conv(attn, out, values, mask, grid)  # (B, N, C)
        return attn.to_out[1](attn.to_out[0](out))


class FusedDiTAttnProcessor(DiTAttnProcessor):
    """:class:`DiTAttnProcessor` on fused projections: what ``fuse_qkv_projections()`` sets. The computation is the
    same (:func:`project_qkv` makes one product whenever the module is fused); the name says the state, as the
    names of diffusers' fused processors do (``FusedAttnProcessor2_0``: diffusers' tests look for the prefix)."""


def project_qkv(
    attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values before the heads are split; one product with fused projections (``to_qkv`` for
    self-attention, ``to_kv`` for cross-attention), unless PEFT wrapped the separate ones (their adapters count)."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    fused = attn.fused_projection()
    if fused is None:
        return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if encoder_hidden_states is None and not attn.is_cross_attention:
        return fused(hidden_states).split(attn.fused_sizes, dim=-1)  # (B, N, C) x 3
    k, v = fused(context).split(attn.fused_sizes, dim=-1)  # (B, L, C) x 2
    return attn.to_q(hidden_states), k, v


def _position_queries_keys(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, rotary: RotaryEmbedding | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """QK-norm, then rotation, then the logit scale on the queries; each step only where it is enabled."""
    if attn.norm_q is not None and getattr(attn, "qk_norm", None) != "layer_norm_across_heads":
        q, k = attn.norm_q(q), attn.norm_k(k)  # (B, *, H, D), per head
    if rotary is None:
        return q, k
    q, k = apply_rotary(q, rotary.cos, rotary.sin), apply_rotary(k, rotary.cos, rotary.sin)  # (B, N, H, D)
    if rotary.logit_scale is not None:
        q = q * rotary.logit_scale.to(q.dtype)  # (B, N, H, D): logits times the scale
    return q, k


def _add_value_conv(
    attn: Attention, out: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None, grid: tuple[int, int]
) -> torch.Tensor:
    """``out`` plus the depthwise convolution of the values on their grid (LiT); padding tokens count as zeros."""
    keep = None if mask is None else mask.keep  # (B, N)
    if use_kernels(v, out, batch_tokens=v.shape[0] * v.shape[1]):  # one Triton kernel, token layout, sum included
        from ..kernels.depthwise_conv import triton_token_dwc

        return triton_token_dwc(v, grid, attn.dwc.weight, attn.dwc.bias, keep=keep, residual=out)  # (B, N, C)
    if keep is not None:
        v = v * keep[:, :, None].to(v.dtype)  # padding contributes nothing to its neighbours
    return out + grid_to_tokens(attn.dwc(tokens_to_grid(v, grid)))  # (B, N, C)


# ----- any other processor, called as diffusers calls it ---------------------------------------------------------
def _options_outside(attn: Attention, rotary: RotaryEmbedding | None) -> list[str]:
    """The options of ``attn`` that only :class:`DiTAttnProcessor` computes."""
    options = {
        "the ReLU linear kernel": attn.kernel != "softmax",
        "key/value compression": attn.kv_compress is not None,
        "the value convolution": attn.dwc is not None,
        "rotary position embedding": rotary is not None,
    }
    return [name for name, used in options.items() if used]


def warn_unused_kwargs(processor: Any, unused: list[str]) -> None:
    """diffusers' warning for ``cross_attention_kwargs`` a processor does not take (they are ignored)."""
    logger.warning(
        f"cross_attention_kwargs {unused} are not expected by {type(processor).__name__} and will be ignored."
    )


def call_processor(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    mask: AttentionMask | None,
    rotary: RotaryEmbedding | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Run a processor that is not a :class:`DiTAttnProcessor` with diffusers' arguments; an attention whose options
    such a processor cannot see is an error naming them (it would silently compute another attention)."""
    processor = attn.processor
    outside = _options_outside(attn, rotary)
    if outside:
        raise ValueError(
            f"{type(processor).__name__} is called as diffusers calls processors and cannot compute this attention's "
            f"{', '.join(outside)}; only DiTAttnProcessor (the default, set_default_attn_processor()) or a subclass "
            "of it can."
        )
    return processor(
        attn,
        hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        attention_mask=None if mask is None else mask.diffusers_bias(hidden_states.dtype),
        **kwargs,
    )
